"""Float64 attention oracle for the tests, written independently of the package's backends.

It expands k/v with repeat_interleave and builds masks from index grids: the slow, obvious way.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention_oracle(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    softmax_scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, lse) of padded attention in float64; q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D)."""
    q, k, v = q.double(), k.double(), v.double()
    batch, seqlen_q, heads_q, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    k = k.repeat_interleave(heads_q // heads_kv, dim=2)
    v = v.repeat_interleave(heads_q // heads_kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    query_pos = torch.arange(seqlen_q)[:, None] + seqlen_k - seqlen_q
    key_pos = torch.arange(seqlen_k)[None, :]
    allowed = torch.ones(batch, 1, seqlen_q, seqlen_k, dtype=torch.bool)
    left, right = window_size
    if causal:
        right = 0
    if right >= 0:
        allowed &= key_pos <= query_pos + right
    if left >= 0:
        allowed &= key_pos >= query_pos - left
    if key_mask is not None:
        key_mask = key_mask.bool().cpu()
        allowed &= key_mask[:, None, None, :]
        if seqlen_q == seqlen_k:
            allowed &= key_mask[:, None, :, None]
    allowed = allowed.to(q.device)
    row_has_key = allowed.any(dim=-1, keepdim=True)
    masked = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(masked, dim=-1)
    probs = torch.softmax(torch.where(row_has_key, masked, torch.zeros_like(masked)), dim=-1) * row_has_key
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return out, lse


def varlen_oracle(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, **kwargs
) -> tuple[Tensor, Tensor]:
    """Packed attention as one oracle call per sequence: out (Tq, Hq, D), lse (Hq, Tq)."""
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        q_i = q[bounds_q[i] : bounds_q[i + 1]][None]
        k_i, v_i = k[bounds_k[i] : bounds_k[i + 1]][None], v[bounds_k[i] : bounds_k[i + 1]][None]
        if q_i.shape[1] == 0:
            continue
        if k_i.shape[1] == 0:
            outs.append(torch.zeros_like(q_i[0], dtype=torch.float64))
            lses.append(torch.full((q.shape[1], q_i.shape[1]), float("-inf"), dtype=torch.float64, device=q.device))
            continue
        out, lse = attention_oracle(q_i, k_i, v_i, **kwargs)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected||, the norm floored at an RMS of 0.1.

    Inputs are unit normal, so 0.1 is well below the natural scale of outputs and gradients; the
    floor only matters where the exact answer is ~0 (a gradient that cancels to rounding noise).
    """
    actual, expected = actual.double(), expected.double()
    floor = 0.1 * expected.numel() ** 0.5
    return ((actual - expected).norm() / max(expected.norm().item(), floor)).item()


# bf16: kernels round every bf16 conversion to nearest even (the interpreter too, see kernels.tiles.convert);
# measured worst case 2.7e-3 (Triton interpreter and the CUDA emulator), 6.7e-3 with the interpreter's truncation.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 5e-3}


def assert_close(actual: Tensor, expected: Tensor, dtype: torch.dtype, what: str) -> None:
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error = relative_error(actual, expected)
    assert error < TOLERANCE[dtype], f"{what}: relative error {error:.2e} >= {TOLERANCE[dtype]:.0e} ({dtype})"
