"""CUDA backend: the hand-written kernels of ``csrc/``, compiled into ``llm2vec_fast._cuda``.

"auto" picks it on CUDA tensors when the extension is built and the inputs are what it was
compiled for (compute capability 8.0+, float16/bfloat16, head dim 64 or 128); anything else
falls through to Triton. The extension is imported lazily, so importing this module never fails
on a machine without it. Its ops, ``torch.ops.llm2vec_fast_cuda.fwd`` and ``.bwd``, get fake
implementations here so that they trace under ``torch.compile`` on their own too.
"""
from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

NAME = "cuda"
EXTENSION = "llm2vec_fast._cuda"
HEAD_DIMS = (64, 128)
DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)


@functools.cache
def _extension_error() -> str | None:
    """None once the extension is imported (and its fake implementations registered), else why not."""
    try:
        importlib.import_module(EXTENSION)
    except ImportError as error:
        return (
            f"the CUDA extension {EXTENSION} is not built ({error}): reinstall with "
            "`pip install --no-build-isolation .` on a machine with nvcc and a CUDA build of torch"
        )
    _register_fakes()
    return None


def unavailable_reason() -> str | None:
    reason = _extension_error()
    if reason is None and not torch.cuda.is_available():
        reason = "no CUDA device is visible"
    return reason


@functools.cache
def _device_limits(index: int) -> tuple[tuple[int, int], int, bool]:
    """(compute capability, opt-in shared memory per block in bytes, whether the extension has
    machine code for it) of a CUDA device."""
    properties = torch.cuda.get_device_properties(index)
    optin = getattr(properties, "shared_memory_per_block_optin", properties.shared_memory_per_block)
    return (properties.major, properties.minor), optin, torch.ops.llm2vec_fast_cuda.has_kernels_for(index)


@functools.cache
def _shared_memory_needed(head_dim: int) -> int:
    return torch.ops.llm2vec_fast_cuda.smem_bytes(head_dim)


def unsupported_reason(q: Tensor, k: Tensor, window_size: tuple[int, int], softcap: float) -> str | None:
    if q.dtype not in DTYPES:
        return f"it supports float16 and bfloat16, got {q.dtype}"
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        return f"its kernels are compiled for head dims {' and '.join(map(str, HEAD_DIMS))}, got {head_dim}"
    if q.device.type != "cuda":
        return f"it runs on CUDA tensors, got a {q.device.type} tensor"
    capability, shared_memory, built_for_it = _device_limits(q.device.index if q.device.index is not None else 0)
    if capability < MIN_CAPABILITY:
        return f"it needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer, got {capability[0]}.{capability[1]}"
    if not built_for_it:
        arch = f"{capability[0]}.{capability[1]}"
        return f"the extension was not built for compute capability {arch}: rebuild with TORCH_CUDA_ARCH_LIST={arch}"
    needed = _shared_memory_needed(head_dim)
    if needed > shared_memory:
        return f"its head-dim-{head_dim} kernels need {needed} bytes of shared memory per block, this GPU allows {shared_memory}"
    return None  # sliding windows and soft caps are supported


def _contiguous(offsets: Tensor | None) -> Tensor | None:
    """The binding reads cu_seqlens with unit stride (it refuses views); every other argument it takes
    with its strides (the key mask) or copies itself where the kernels need it (q/k/v/out/dout
    without a unit last stride or 16-byte rows, lse and dlse not contiguous)."""
    return None if offsets is None else offsets.contiguous()


def forward(q, k, v, key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_size,
            softcap, softmax_scale) -> tuple[Tensor, Tensor]:
    cu_seqlens_q, cu_seqlens_k = _contiguous(cu_seqlens_q), _contiguous(cu_seqlens_k)
    return torch.ops.llm2vec_fast_cuda.fwd(
        q, k, v, key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal, window_size[0], window_size[1], softcap, softmax_scale,
    )


def backward(dout, q, k, v, out, lse, dlse, key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             causal, window_size, softcap, softmax_scale, deterministic) -> tuple[Tensor, Tensor, Tensor]:
    cu_seqlens_q, cu_seqlens_k = _contiguous(cu_seqlens_q), _contiguous(cu_seqlens_k)
    return torch.ops.llm2vec_fast_cuda.bwd(
        dout, q, k, v, out, lse, dlse, key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        causal, window_size[0], window_size[1], softcap, softmax_scale, deterministic,
    )


def _register_fakes() -> None:
    """Shapes and dtypes of the extension's outputs, for tracing without running the kernels."""

    @torch.library.register_fake("llm2vec_fast_cuda::fwd")
    def _fwd_fake(q, k, v, key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                  window_left, window_right, softcap, softmax_scale):
        varlen = cu_seqlens_q is not None
        lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
        return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)

    @torch.library.register_fake("llm2vec_fast_cuda::bwd")
    def _bwd_fake(dout, q, k, v, out, lse, dlse, key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                  max_seqlen_k, causal, window_left, window_right, softcap, softmax_scale, deterministic):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
