"""Triton kernels for bidirectional flash attention (installed as ``llm2vec_fast.kernels``)."""
