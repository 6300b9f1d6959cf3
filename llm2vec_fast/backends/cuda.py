"""CUDA backend: the hand-written kernels of ``csrc/``, compiled into ``llm2vec_fast._cuda``.

"auto" picks it on CUDA tensors when the extension is built and the inputs are what it was
compiled for (compute capability 8.0+, float16/bfloat16, head dim 64 or 128); anything else
falls through to Triton. On compute capability 9.x the extension's forward runs its Hopper
(sm_90a) kernel when it was built with one (csrc/flash_api.cpp decides; the op is the same).
The extension is imported lazily, so importing this module never fails on a machine without it.
Its ops, ``torch.ops.llm2vec_fast_cuda.fwd`` and ``.bwd``, get fake implementations here so
that they trace under ``torch.compile`` on their own too.
"""

from __future__ import annotations

import functools
import importlib

import torch
from torch import Tensor

from ..attention_options import AttentionLayout, AttentionOptions

NAME = "cuda"
KEY_MASK_FORM = "bits"  # packed by the extension once per mask (key_masks), not once per call
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


def unsupported_reason(q: Tensor, k: Tensor, options: AttentionOptions) -> str | None:
    if q.dtype not in DTYPES:
        return f"it supports float16 and bfloat16, got {q.dtype}"
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        return f"its kernels are compiled for head dims {' and '.join(map(str, HEAD_DIMS))}, got {head_dim}"
    if q.device.type != "cuda":
        return f"it runs on CUDA tensors, got a {q.device.type} tensor"
    capability, shared_memory, built_for_it = _device_limits(q.device.index if q.device.index is not None else 0)
    if capability < MIN_CAPABILITY:
        needed_arch, arch = ".".join(map(str, MIN_CAPABILITY)), ".".join(map(str, capability))
        return f"it needs compute capability {needed_arch} or newer, got {arch}"
    if not built_for_it:
        arch = f"{capability[0]}.{capability[1]}"
        return f"the extension was not built for compute capability {arch}: rebuild with TORCH_CUDA_ARCH_LIST={arch}"
    needed = _shared_memory_needed(head_dim)
    if needed > shared_memory:
        return (
            f"its head-dim-{head_dim} kernels need {needed} bytes of shared memory per block, "
            f"this GPU allows {shared_memory}"
        )
    return None  # sliding windows and soft caps are supported


def _layout_args(layout: AttentionLayout) -> tuple:
    """(key_bits, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) as the binding takes them: the mask
    as packed bits, the offsets with unit stride (it refuses views); every other argument it copies itself
    where the kernels need it (q/k/v/out/dout without a unit last stride or 16-byte rows, lse and dlse not
    contiguous)."""
    offsets = (None if cu is None else cu.contiguous() for cu in (layout.cu_seqlens_q, layout.cu_seqlens_k))
    return (layout.key_mask_state, *offsets, layout.max_seqlen_q, layout.max_seqlen_k)


def forward(
    q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, options: AttentionOptions
) -> tuple[Tensor, Tensor]:
    return torch.ops.llm2vec_fast_cuda.fwd(
        q, k, v, *_layout_args(layout), options.causal, *options.window, options.softcap, options.softmax_scale
    )


def backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Tensor | None,
    layout: AttentionLayout,
    options: AttentionOptions,
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.llm2vec_fast_cuda.bwd(dout, q, k, v, out, lse, dlse, *_layout_args(layout), *options.schema_args())


def _register_fakes() -> None:
    """Shapes and dtypes of the extension's outputs, for tracing without running the kernels."""

    @torch.library.register_fake("llm2vec_fast_cuda::fwd")
    def _fwd_fake(q, k, v, key_bits, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *options):
        layout = AttentionLayout(None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return q.new_empty(q.shape), q.new_empty(layout.lse_shape(q), dtype=torch.float32)

    @torch.library.register_fake("llm2vec_fast_cuda::bwd")
    def _bwd_fake(dout, q, k, v, *rest):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("llm2vec_fast_cuda::pack_key_mask")
    def _pack_fake(key_mask):
        words = (key_mask.shape[1] + 127) // 128 * 4  # key_bits_words in csrc/flash_attn/params_builder.h
        return key_mask.new_empty((key_mask.shape[0], words), dtype=torch.int32)
