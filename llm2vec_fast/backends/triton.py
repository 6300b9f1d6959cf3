"""Triton backend: the fused kernels of ``llm2vec_fast.kernels`` on CUDA tensors.

CPU tensors are accepted only under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests);
"auto" never picks this backend for CPU tensors.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from llm2vec_fast.kernels.attention_bwd import attention_backward
from llm2vec_fast.kernels.attention_fwd import attention_forward
from llm2vec_fast.kernels.common import INTERPRETING

NAME = "triton"


def unavailable_reason() -> str | None:
    if INTERPRETING or torch.cuda.is_available():
        return None
    return "no CUDA device is visible (set TRITON_INTERPRET=1 before importing to use the CPU interpreter)"


def unsupported_reason(q: Tensor, k: Tensor, window_size: tuple[int, int], softcap: float) -> str | None:
    if q.device.type == "cuda":
        return None
    if INTERPRETING and q.device.type == "cpu":
        return None
    return f"it runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got a {q.device.type} tensor"


def _on_device(tensor: Tensor):
    """Triton launches on the current CUDA device: make it the inputs' device."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def forward(q, k, v, key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_size,
            softcap, softmax_scale) -> tuple[Tensor, Tensor]:
    with _on_device(q):
        return attention_forward(q, k, v, key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 causal, window_size, softcap, softmax_scale)


def backward(dout, q, k, v, out, lse, dlse, key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             causal, window_size, softcap, softmax_scale, deterministic) -> tuple[Tensor, Tensor, Tensor]:
    with _on_device(q):
        return attention_backward(dout, q, k, v, out, lse, dlse, key_mask, cu_seqlens_q, cu_seqlens_k,
                                  max_seqlen_q, max_seqlen_k, causal, window_size, softcap, softmax_scale)
