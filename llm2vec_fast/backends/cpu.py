"""torch's fused CPU attention (the flash kernel behind ``scaled_dot_product_attention``): the CPU fast path.

A padded batch is one kernel call (its key mask, window or bottom-right causal bound as an additive mask
built by the reference's ``_allowed``); a packed batch is one call per sequence on views of the packed
tensors (no copies in unless a last stride is not 1, one copy out). GQA is the kernel's own (k/v never
expanded; a torch whose kernel lacks it hands GQA calls to the reference); the backward is the kernel's
backward from the saved output and log-sum-exp.

The reference backend stays the semantic model; this one computes it only where torch's kernel does:
- finite inputs whose scores cannot overflow float32 (checked, one pass over q, k, v). The kernel turns a
  NaN or +inf score row into zeros (not NaN) and multiplies masked keys by zero (a NaN there leaks), so
  any other call is the reference's. The backward checks ``dout`` likewise and hands a non-finite
  gradient it computes to the reference, which decides NaN from inf;
- no softcap (the kernel has none): `unsupported_reason` says so and "auto" takes the reference;
- a gradient of the log-sum-exp (``dlse``) goes to the reference backward (the kernel's takes none).
Rows that see no key get zeros and ``lse = -inf`` here (the kernel gives them lse 0), and the backward
hands the kernel ``lse = +inf`` for them, so their probabilities are exactly 0.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..attention_options import AttentionLayout, AttentionOptions
from . import reference

NAME = "cpu"
KEY_MASK_FORM = "bool"
SCORE_BOUND = 1e37
"""The fast path's bound on ``||q|| * ||k|| * |scale|`` (Frobenius norms, which bound every score): below
float32's 3.4e38 with margin."""

_FORWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def unavailable_reason() -> str | None:
    if _FORWARD is None or _BACKWARD is None:
        return (
            f"torch {torch.__version__} has no fused CPU attention (aten._scaled_dot_product_flash_attention_for_cpu)"
        )
    return None


@functools.cache
def _native_gqa() -> bool:
    """Whether this torch's kernel takes fewer key/value heads than query heads (torch 2.13's does)."""
    try:
        _FORWARD(torch.zeros(1, 2, 1, 8), torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 1, 8), 0.0, False)
    except RuntimeError:
        return False
    return True


def unsupported_reason(q: Tensor, k: Tensor, options: AttentionOptions) -> str | None:
    if q.device.type != "cpu":
        return f"it runs on CPU tensors, got {q.device.type} tensors"
    if options.softcap > 0:
        return "torch's fused CPU attention has no softcap (the reference backend computes it)"
    if q.shape[-2] != k.shape[-2] and not _native_gqa():
        return f"torch {torch.__version__}'s fused CPU attention has no GQA (the reference backend computes it)"
    return None


def _norms(*tensors: Tensor) -> list[float]:
    """The Frobenius norm of each tensor, in one host transfer: finite only if every element is finite (inf if
    the sum of squares overflows). The fastest full reduction torch has on strided views (the max-abs norm is
    ~20x slower there); float16 norms are taken in float32, which has the range bfloat16 has already."""
    norms = [torch.linalg.vector_norm(t, dtype=torch.float32 if t.dtype == torch.float16 else None) for t in tensors]
    return torch.stack([norm.float() for norm in norms]).tolist()


def _kernel_exact(q: Tensor, k: Tensor, v: Tensor, scale: float) -> bool:
    """True when q, k, v are finite and no score can overflow: where the kernel computes the reference's result."""
    q_norm, k_norm, v_norm = _norms(q, k, v)
    return q_norm * k_norm * abs(scale) < SCORE_BOUND and v_norm < float("inf")


def _pattern(
    q: Tensor, k: Tensor, key_mask: Tensor | None, options: AttentionOptions
) -> tuple[Tensor | None, bool, Tensor | None]:
    """(additive mask (B or 1, 1, Sq, Sk) or None, the kernel's is_causal, rows seeing no key (B or 1, 1, Sq) or None).

    The kernel's causal is top-left aligned: it is ours (bottom-right) only when Sq == Sk.
    """
    seqlen_q, seqlen_k, window = q.shape[1], k.shape[1], options.key_window
    if key_mask is None and (window == (-1, -1) or (window == (-1, 0) and seqlen_q == seqlen_k)):
        return None, window == (-1, 0), None
    allowed = reference._allowed(seqlen_q, seqlen_k, key_mask, options, q.device)[:, 0]
    additive = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    blind = ~allowed.any(dim=-1)
    return additive, False, blind if bool(blind.any()) else None


def _heads_first(*tensors: Tensor) -> tuple[Tensor, ...]:
    """(B, S, H, D) tensors as the kernel's (B, H, S, D) views; it reads any strides but a last one other than 1
    (it reads those wrong, silently), so those are copied."""
    return tuple((t if t.stride(-1) == 1 else t.contiguous()).transpose(1, 2) for t in tensors)


def _attend(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, options: AttentionOptions
) -> tuple[Tensor, Tensor]:
    """(out (B, Sq, H, D), lse (B, H, Sq)) of finite (B, S, H, D) inputs in one kernel call."""
    mask, causal, blind = _pattern(q, k, key_mask, options)
    out, lse = _FORWARD(*_heads_first(q, k, v), 0.0, causal, attn_mask=mask, scale=options.softmax_scale)
    if blind is not None:
        out = out.masked_fill(blind[..., None], 0.0)
        lse = lse.masked_fill(blind, float("-inf"))
    return out.transpose(1, 2), lse


def _attend_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, key_mask: Tensor | None, options
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of one kernel call, shaped (B, S, H, D); rows of lse -inf (no key seen) get +inf (weights 0)."""
    mask, causal, _ = _pattern(q, k, key_mask, options)
    kernel_lse = lse.masked_fill(lse == float("-inf"), float("inf")).contiguous()
    grads = _BACKWARD(
        *_heads_first(dout, q, k, v, out), kernel_lse, 0.0, causal, attn_mask=mask, scale=options.softmax_scale
    )
    return tuple(g.transpose(1, 2) for g in grads)


def _sequence_bounds(layout: AttentionLayout) -> list[tuple[int, int, int, int]]:
    starts_q, starts_k = layout.cu_seqlens_q.tolist(), layout.cu_seqlens_k.tolist()
    return [(starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]) for i in range(len(starts_q) - 1)]


def forward(
    q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, options: AttentionOptions
) -> tuple[Tensor, Tensor]:
    if not _kernel_exact(q, k, v, options.softmax_scale):
        return reference.forward(q, k, v, layout, options)
    if not layout.is_packed:
        out, lse = _attend(q, k, v, layout.key_mask, options)
        return out.contiguous(), lse.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(layout.lse_shape(q), dtype=torch.float32, device=q.device)
    for q0, q1, k0, k1 in _sequence_bounds(layout):
        if q1 == q0:
            continue
        if k1 == k0:
            out[q0:q1], lse[:, q0:q1] = 0.0, float("-inf")
            continue
        seq_out, seq_lse = _attend(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], None, options)
        out[q0:q1], lse[:, q0:q1] = seq_out[0], seq_lse[0]
    return out, lse


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
    exact = dlse is None and _kernel_exact(q, k, v, options.softmax_scale) and _norms(dout)[0] < float("inf")
    grads = _backward_fast(dout, q, k, v, out, lse, layout, options) if exact else None
    if grads is None or not all(bool(torch.isfinite(g).all()) for g in grads):
        return reference.backward(dout, q, k, v, out, lse, dlse, layout, options)
    return grads


def _backward_fast(dout, q, k, v, out, lse, layout: AttentionLayout, options) -> tuple[Tensor, Tensor, Tensor]:
    if not layout.is_packed:
        return tuple(g.contiguous() for g in _attend_backward(dout, q, k, v, out, lse, layout.key_mask, options))
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk, dv = (
        torch.zeros_like(k, memory_format=torch.contiguous_format),
        torch.zeros_like(v, memory_format=torch.contiguous_format),
    )
    for q0, q1, k0, k1 in _sequence_bounds(layout):
        if q1 == q0:
            continue
        if k1 == k0:
            dq[q0:q1] = 0.0
            continue
        seq = (t[None, q0:q1] for t in (dout, q))
        grads = _attend_backward(
            *seq, k[None, k0:k1], v[None, k0:k1], out[None, q0:q1], lse[None, :, q0:q1], None, options
        )
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (g[0] for g in grads)
    return dq, dk, dv
