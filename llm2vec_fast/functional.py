"""Public attention functions, with flash-attn's layouts and calling conventions.

Semantics shared by every backend:
- non-causal by default; ``causal=True`` aligns the mask bottom-right (query ``i`` sees keys
  ``j <= i + Sk - Sq``), as flash-attn >= 2.1;
- ``window_size=(left, right)`` restricts query ``i`` to keys in
  ``[i + Sk - Sq - left, i + Sk - Sq + right]`` (-1 = unbounded; sliding-window attention);
- ``softcap > 0`` caps scaled scores as ``softcap * tanh(score / softcap)`` (Gemma 2);
- GQA/MQA: ``Hq`` a multiple of ``Hkv``; query head ``h`` reads key/value head ``h // (Hq // Hkv)``;
- a query row that can see no key (a fully padded sequence) outputs zeros, its log-sum-exp is
  ``-inf`` and its gradients are zero;
- with a key-padding mask and ``Sq == Sk`` (self-attention) the mask also marks query rows:
  padded query positions output zeros;
- every tensor argument may be a strided view (q/k/v such as ``(B, H, S, D).transpose(1, 2)``,
  masks such as ``mask.t()``, offsets, and the gradients autograd hands the backward, e.g. the
  all-zero-stride one of ``out.sum()``); a backend copies what its kernels cannot read in place.
  Outputs and gradients are contiguous;
- non-finite values: NaN for the rows (or output elements) that see them, as in flash-attn; keys a
  row does not see never reach it, whatever they hold (README, "Semantics").

The two public functions keep flash-attn's signatures, so their keyword lists repeat; everything
behind them is one helper, ``_attention``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers torch.ops.llm2vec_fast)
from .attention_options import AttentionLayout, AttentionOptions
from .backends import resolve_backend
from .validation import (
    check_qkv,
    check_varlen_args,
    check_window_and_softcap,
    normalize_key_mask,
    softmax_scale_or_default,
)


def _attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: AttentionLayout,
    causal: bool,
    softmax_scale: float | None,
    window_size: tuple[int, int],
    softcap: float,
    deterministic: bool,
    backend: str | None,
) -> tuple[Tensor, Tensor]:
    """(out, lse) of inputs whose tensors are checked: validates the options and calls the op once."""
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    window_size, softcap = check_window_and_softcap(window_size, softcap)
    options = AttentionOptions(bool(causal), window_size, softcap, scale, bool(deterministic))
    name = resolve_backend(q, k, backend, options)
    return torch.ops.llm2vec_fast.attention_forward(
        q,
        k,
        v,
        layout.key_mask,
        layout.cu_seqlens_q,
        layout.cu_seqlens_k,
        layout.max_seqlen_q,
        layout.max_seqlen_k,
        *options.schema_args(),
        name,
    )


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attention_mask: Tensor | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    *,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over padded batches.

    Args:
        q: ``(batch, seqlen_q, heads_q, head_dim)``, float16, bfloat16 or float32.
        k, v: ``(batch, seqlen_k, heads_kv, head_dim)``, ``heads_q % heads_kv == 0``.
        attention_mask: optional ``(batch, seqlen_k)`` bool or integer key-padding mask,
            nonzero = real token. Left padding, right padding and holes are all allowed.
        causal: apply a (bottom-right aligned) causal mask.
        softmax_scale: defaults to ``head_dim ** -0.5``.
        window_size: ``(left, right)`` sliding window around each query's aligned position, -1 = unbounded.
        softcap: if > 0, cap scores with ``softcap * tanh(score / softcap)``.
        return_lse: also return the log-sum-exp ``(batch, heads_q, seqlen_q)`` in float32 (differentiable).
        deterministic: request a deterministic backward from backends that have a faster one.
        backend: ``"auto"``, ``"cuda"``, ``"triton"``, ``"cpu"`` or ``"reference"``; defaults to the
            ``LLM2VEC_FAST_BACKEND`` environment variable, then ``"auto"``.

    Returns:
        ``out`` shaped like ``q``, or ``(out, lse)`` when ``return_lse``.
    """
    check_qkv(q, k, v, varlen=False)
    layout = AttentionLayout(normalize_key_mask(attention_mask, q, k), None, None, q.shape[1], k.shape[1])
    out, lse = _attention(q, k, v, layout, causal, softmax_scale, window_size, softcap, deterministic, backend)
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    softmax_scale: float | None = None,
    *,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    deterministic: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over packed variable-length sequences, no padding anywhere.

    Args:
        q: ``(total_q, heads_q, head_dim)``; k, v: ``(total_k, heads_kv, head_dim)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)`` offsets of each sequence in the
            packed tensors, starting at 0 and ending at the token count.
        max_seqlen_q, max_seqlen_k: upper bounds on the sequence lengths (checked).
        causal, softmax_scale, window_size, softcap, deterministic, backend: as in :func:`flash_attn_func`.
        return_lse: also return the log-sum-exp ``(heads_q, total_q)`` in float32.

    Returns:
        ``out`` shaped like ``q``, or ``(out, lse)`` when ``return_lse``.
    """
    check_qkv(q, k, v, varlen=True)
    check_varlen_args(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    layout = AttentionLayout(None, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out, lse = _attention(q, k, v, layout, causal, softmax_scale, window_size, softcap, deterministic, backend)
    return (out, lse) if return_lse else out
