"""The C++ source of the fused CPU ops (fused_ops.cpp), shipped inside the package as ``llm2vec_fast._cpu_source``
so that ``llm2vec_fast.cpu_fused`` can compile it on first use wherever the package is installed."""
