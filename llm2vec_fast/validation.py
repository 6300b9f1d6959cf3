"""Input checks for the attention ops: every bad input raises an error that names the problem.

Shape, dtype and device checks read only metadata, so they also run while torch.compile traces.
`check_cu_seqlens_values` reads the offsets themselves (a host sync on GPU), so it runs inside
the op's eager implementation and remembers offsets it has already checked (a `TensorCache`): a
model calling the op once per layer with the same `cu_seqlens` pays for one check per forward.
Inference tensors (made under `torch.inference_mode()`) keep no version counter, so an in-place
edit cannot be seen: their offsets are checked on every call. A caller that built the offsets from
lengths on the host checks them there instead (`check_host_offsets`): the ops then never sync on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .tensor_cache import TensorCache

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_BATCH = 65535  # CUDA grid limit on the batch dimension of the launch
MAX_SOFTMAX_SCALE = 1e6  # keeps scale * log2(e) * |q.k| below float32's limit for |q.k| <= 1e32


def _require_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_qkv(q: Tensor, k: Tensor, v: Tensor, varlen: bool) -> None:
    """Ranks, dtypes, devices, head counts and head dim of q, k, v in flash-attn's layout."""
    layout = "(total_tokens, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    rank = 3 if varlen else 4
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        _require_tensor(name, tensor)
        if tensor.dim() != rank:
            raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(tensor.shape)}")
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {tensor.dtype}; supported dtypes are float16, bfloat16 and float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    head_dim, heads_q, heads_kv = q.shape[-1], q.shape[-2], k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"q and k must have the same head_dim, got {head_dim} and {k.shape[-1]}")
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(
            f"the number of query heads ({heads_q}) must be a multiple of the number of key/value heads ({heads_kv})"
        )
    if head_dim % 8 != 0 or not 8 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"unsupported head_dim {head_dim}: it must be a multiple of 8 between 8 and {MAX_HEAD_DIM}")
    if not varlen and q.shape[0] > MAX_BATCH:
        raise ValueError(f"batch size {q.shape[0]} exceeds the supported maximum of {MAX_BATCH}")


def normalize_key_mask(attention_mask: Tensor | None, q: Tensor, k: Tensor) -> Tensor | None:
    """The (batch, seqlen_k) key-padding mask as bool (True = real token), or None."""
    if attention_mask is None:
        return None
    _require_tensor("attention_mask", attention_mask)
    expected = (k.shape[0], k.shape[1])
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != expected:
        raise ValueError(
            f"attention_mask must be a (batch, seqlen_k) = {expected} key-padding mask, "
            f"got shape {tuple(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool and attention_mask.dtype.is_floating_point:
        raise TypeError(
            f"attention_mask must be bool or integer (1 = real token, 0 = padding), got {attention_mask.dtype}; "
            "additive float masks are not supported"
        )
    if attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be bool or integer, got {attention_mask.dtype}")
    if attention_mask.device != q.device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but q is on {q.device}")
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0


def check_varlen_args(
    q: Tensor, k: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int
) -> None:
    """Metadata of the cu_seqlens offsets and the max_seqlen bounds."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        _require_tensor(name, cu)
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must be a 1-D tensor of batch + 1 offsets, got shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
            f"got {cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}"
        )
    if cu_seqlens_q.numel() - 1 > MAX_BATCH:
        raise ValueError(f"{cu_seqlens_q.numel() - 1} sequences exceed the supported maximum of {MAX_BATCH}")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"{name} must be a non-negative int, got {value!r}")


def softmax_scale_or_default(softmax_scale: float | None, head_dim: int) -> float:
    """The scale as a float; |scale| <= MAX_SOFTMAX_SCALE, so that kernels folding it into the exponent
    (s * scale * log2(e)) cannot overflow float32 for any score |q.k| <= 1e32."""
    if softmax_scale is None:
        return head_dim**-0.5
    if (
        isinstance(softmax_scale, bool)
        or not isinstance(softmax_scale, (int, float))
        or not math.isfinite(softmax_scale)
    ):
        raise TypeError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    if abs(softmax_scale) > MAX_SOFTMAX_SCALE:
        bound = f"{MAX_SOFTMAX_SCALE:g}"
        raise ValueError(f"softmax_scale must lie in [-{bound}, {bound}], got {softmax_scale!r}")
    return float(softmax_scale)


def check_window_and_softcap(window_size: tuple[int, int], softcap: float) -> tuple[tuple[int, int], float]:
    """``window_size`` as two ints >= -1 and ``softcap`` as a float >= 0."""
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)
    ):
        raise ValueError(f"window_size must be a pair of ints >= -1 (-1 = unbounded), got {window_size!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite float >= 0 (0 = off), got {softcap!r}")
    return (int(window_size[0]), int(window_size[1])), float(softcap)


_checked_offsets = TensorCache()


def check_cu_seqlens_values(name: str, cu: Tensor, total_tokens: int, max_seqlen: int) -> None:
    """Offsets start at 0, never decrease, end at the token count, and respect max_seqlen (the offsets are
    read once per tensor, the bound compared on every call)."""
    longest = _checked_offsets.get(cu, total_tokens, lambda: _check_offsets(name, cu.tolist(), total_tokens))
    if longest > max_seqlen:
        raise ValueError(f"{name} holds a sequence of {longest} tokens, longer than max_seqlen={max_seqlen}")


def check_host_offsets(cu: Tensor, offsets: Sequence[int]) -> None:
    """Check the values of `cu` known on the host (the offsets it was just built from) and remember them, so
    that `check_cu_seqlens_values` never reads `cu` back from the device: no host sync, which a CUDA graph
    capture cannot contain. Inference tensors are never remembered (see `TensorCache`): pass a `cacheable` one."""
    offsets = list(offsets)
    _checked_offsets.get(cu, offsets[-1], lambda: _check_offsets("cu_seqlens", offsets, offsets[-1]))


def _check_offsets(name: str, offsets: list[int], total_tokens: int) -> int:
    """The longest sequence of valid offsets (else a ValueError naming what is wrong)."""
    lengths = [end - start for start, end in zip(offsets[:-1], offsets[1:])]
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    if any(length < 0 for length in lengths):
        raise ValueError(f"{name} must be non-decreasing, got {offsets}")
    if offsets[-1] != total_tokens:
        raise ValueError(f"{name} ends at {offsets[-1]} but the packed tensor holds {total_tokens} tokens")
    return max(lengths, default=0)
