"""The Triton backend (``llm2vec_fast.backends`` contract): the fused kernels on CUDA tensors.

CPU tensors are accepted only under ``TRITON_INTERPRET=1`` (Triton's interpreter, for tests);
"auto" never picks this backend for CPU tensors. ``layout`` and ``options`` are llm2vec_fast's
AttentionLayout (key mask derived as KeySpans, per KEY_MASK_FORM) and AttentionOptions.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .attention_bwd import attention_backward
from .attention_fwd import attention_forward
from .launch import INTERPRETING

NAME = "triton"
KEY_MASK_FORM = "spans"


def unavailable_reason() -> str | None:
    if INTERPRETING or torch.cuda.is_available():
        return None
    return "no CUDA device is visible (set TRITON_INTERPRET=1 before importing to use the CPU interpreter)"


def unsupported_reason(q: Tensor, k: Tensor, options) -> str | None:
    if q.device.type == "cuda":
        return None
    if INTERPRETING and q.device.type == "cpu":
        return None
    return f"it runs on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got a {q.device.type} tensor"


def _on_device(tensor: Tensor):
    """Triton launches on the current CUDA device: make it the inputs' device."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def forward(q: Tensor, k: Tensor, v: Tensor, layout, options) -> tuple[Tensor, Tensor]:
    with _on_device(q):
        return attention_forward(q, k, v, layout, options)


def backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None, layout, options
) -> tuple[Tensor, Tensor, Tensor]:
    with _on_device(q):
        return attention_backward(dout, q, k, v, out, lse, dlse, layout, options)
