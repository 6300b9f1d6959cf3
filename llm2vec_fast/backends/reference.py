"""Exact PyTorch attention: the CPU backend and the semantic model every kernel must match.

Scores are materialised in float32 (grouped by KV head, never expanding k/v), so memory is
O(Sq * Sk) per head: right for CPU-sized inputs and for checking kernels, not for long GPU runs.
The backward recomputes probabilities from the saved log-sum-exp, exactly as the kernels do.

Non-finite values (the model every kernel matches): keys a row does not see are *selected out*
(never multiplied by zero), so whatever they hold cannot reach that row. Over the keys it sees a
row follows IEEE arithmetic: a NaN or +inf score makes its output and lse NaN, a non-finite value
of a seen key makes the output (or gradient) elements that use it NaN, and a row that sees no
key or only -inf scores outputs zeros with lse = -inf.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention_options import AttentionLayout, AttentionOptions

NAME = "reference"
KEY_MASK_FORM = "bool"


def unavailable_reason() -> str | None:
    return None


def unsupported_reason(q: Tensor, k: Tensor, options: AttentionOptions) -> str | None:
    return None


def _allowed(
    seqlen_q: int,
    seqlen_k: int,
    key_mask: Tensor | None,
    options: AttentionOptions,
    device: torch.device,
) -> Tensor:
    """Boolean (B or 1, 1, 1, Sq, Sk) matrix of query/key pairs that may attend.

    Query i sits at key position i + Sk - Sq (bottom-right alignment, as flash-attn) and sees
    keys within ``options.key_window = (left, right)`` of it (-1 = unbounded; causal means right = 0).
    With a key-padding mask and Sq == Sk (self-attention) padded query rows see nothing.
    """
    left, right = options.key_window
    rows = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    cols = torch.arange(seqlen_k, device=device)[None, :]
    allowed = torch.ones(1, seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if right >= 0:
        allowed = allowed & (cols <= rows + right)
    if left >= 0:
        allowed = allowed & (cols >= rows - left)
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, :]
        if seqlen_q == seqlen_k:
            allowed = allowed & key_mask[:, :, None]
    return allowed[:, None, None]


def _grouped(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float32 views (B, Hkv, G, Sq, D) for q and (B, Hkv, 1, Sk, D) for k and v."""
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    q32 = q.float().view(batch, seqlen_q, heads_kv, heads_q // heads_kv, head_dim).permute(0, 2, 3, 1, 4)
    k32 = k.float().permute(0, 2, 1, 3)[:, :, None]
    v32 = v.float().permute(0, 2, 1, 3)[:, :, None]
    return q32, k32, v32


def _scores(q32: Tensor, k32: Tensor, allowed: Tensor, scale: float, softcap: float) -> Tensor:
    """Scaled (and, with softcap > 0, ``softcap * tanh(s / softcap)``-capped) masked scores."""
    scores = (q32 @ k32.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    return scores.masked_fill(~allowed, float("-inf"))


def _probabilities(scores: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the seen keys and its lse: NaN where a seen score is NaN or +inf; a row whose
    seen scores are all -inf (or that sees none) gets probabilities 0 and lse -inf."""
    lse = torch.logsumexp(scores, dim=-1)
    lse = torch.where(lse == float("inf"), torch.full_like(lse, float("nan")), lse)
    return _seen_probabilities(scores, allowed, lse), lse


def _seen_probabilities(scores: Tensor, allowed: Tensor, lse: Tensor) -> Tensor:
    """exp(scores - lse) on the pairs a row sees, 0 elsewhere and on rows whose lse is -inf."""
    lse_for_probs = torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse)
    return torch.exp(scores - lse_for_probs[..., None]).masked_fill(~allowed, 0.0)


def _seen_product(weights: Tensor, allowed: Tensor, values: Tensor) -> Tensor:
    """weights @ values summed over the pairs `allowed` marks, weights 0 elsewhere: values of keys a
    row does not see are selected out; a non-finite value of a seen key (or any non-finite result)
    makes that element NaN, whatever its weight."""
    finite = torch.isfinite(values)
    if finite.all():
        result = weights @ values
    else:
        poisoned = (allowed.to(values.dtype) @ (~finite).to(values.dtype)) > 0
        result = (weights @ torch.where(finite, values, torch.zeros_like(values))).masked_fill(poisoned, float("nan"))
    return result.masked_fill(torch.isinf(result), float("nan"))


def _forward_padded(q, k, v, key_mask, options):
    batch, seqlen_q, heads_q, head_dim = q.shape
    q32, k32, v32 = _grouped(q, k, v)
    allowed = _allowed(seqlen_q, k.shape[1], key_mask, options, q.device)
    probs, lse = _probabilities(_scores(q32, k32, allowed, options.softmax_scale, options.softcap), allowed)
    out = _seen_product(probs, allowed, v32).masked_fill((lse == float("-inf"))[..., None], 0.0)
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, seqlen_q, heads_q, head_dim)
    return out.to(q.dtype).contiguous(), lse.reshape(batch, heads_q, seqlen_q)


def _backward_padded(dout, q, k, v, out, lse, dlse, key_mask, options):
    batch, seqlen_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    group = heads_q // heads_kv
    q32, k32, v32 = _grouped(q, k, v)
    do32 = dout.float().view(batch, seqlen_q, heads_kv, group, head_dim).permute(0, 2, 3, 1, 4)
    lse = lse.view(batch, heads_kv, group, seqlen_q)
    delta = (dout.float() * out.float()).sum(-1).view(batch, seqlen_q, heads_kv, group).permute(0, 2, 3, 1)
    if dlse is not None:
        delta = delta - dlse.float().view(batch, heads_kv, group, seqlen_q)
    allowed = _allowed(seqlen_q, k.shape[1], key_mask, options, q.device)
    scale, softcap = options.softmax_scale, options.softcap
    scores = _scores(q32, k32, allowed, scale, softcap)
    probs = _seen_probabilities(scores, allowed, lse)
    dscores = probs * (do32 @ v32.transpose(-1, -2) - delta[..., None])
    if softcap > 0:
        dscores = dscores * (1 - (scores / softcap).square())
    dscores = dscores.masked_fill(~allowed, 0.0)
    allowed_t = allowed.transpose(-1, -2)
    dq = _seen_product(dscores, allowed, k32) * scale
    dk = _seen_product(dscores.transpose(-1, -2), allowed_t, q32).sum(2) * scale
    dv = _seen_product(probs.transpose(-1, -2), allowed_t, do32).sum(2)
    dq = dq.permute(0, 3, 1, 2, 4).reshape(q.shape)
    return (
        dq.to(q.dtype).contiguous(),
        dk.transpose(1, 2).contiguous().to(k.dtype),
        dv.transpose(1, 2).contiguous().to(v.dtype),
    )


def _sequence_bounds(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor) -> list[tuple[int, int, int, int]]:
    starts_q = cu_seqlens_q.tolist()
    starts_k = cu_seqlens_k.tolist()
    return [(starts_q[i], starts_q[i + 1], starts_k[i], starts_k[i + 1]) for i in range(len(starts_q) - 1)]


def forward(
    q: Tensor, k: Tensor, v: Tensor, layout: AttentionLayout, options: AttentionOptions
) -> tuple[Tensor, Tensor]:
    if not layout.is_packed:
        return _forward_padded(q, k, v, layout.key_mask, options)
    out = q.new_zeros(q.shape)
    lse = torch.full(layout.lse_shape(q), float("-inf"), dtype=torch.float32, device=q.device)
    for q0, q1, k0, k1 in _sequence_bounds(layout.cu_seqlens_q, layout.cu_seqlens_k):
        if q1 == q0:
            continue
        seq_out, seq_lse = _forward_padded(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], None, options)
        out[q0:q1] = seq_out[0]
        lse[:, q0:q1] = seq_lse[0]
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
    if not layout.is_packed:
        return _backward_padded(dout, q, k, v, out, lse, dlse, layout.key_mask, options)
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for q0, q1, k0, k1 in _sequence_bounds(layout.cu_seqlens_q, layout.cu_seqlens_k):
        if q1 == q0 or k1 == k0:
            continue
        seq_dlse = None if dlse is None else dlse[None, :, q0:q1]
        grads = _backward_padded(
            dout[None, q0:q1],
            q[None, q0:q1],
            k[None, k0:k1],
            v[None, k0:k1],
            out[None, q0:q1],
            lse[None, :, q0:q1],
            seq_dlse,
            None,
            options,
        )
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (g[0] for g in grads)
    return dq, dk, dv
