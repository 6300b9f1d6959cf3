"""GPU-only checks of the Triton backend at real sizes (skipped without CUDA).

References: SDPA-math in float64 (exact) and SDPA with a boolean mask in the input dtype (what
users switch from). Autotuning runs here, so every tuned configuration is exercised.
"""

import pytest
import torch
import torch.nn.functional as F
from oracle import TOLERANCE, relative_error

from llm2vec_fast import flash_attn_func, flash_attn_varlen_func

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned_outputs")]


def sdpa_reference(q, k, v, mask, causal, dtype=torch.float64):
    """SDPA-math on (B, S, H, D) inputs with a key-padding mask; padded query rows zeroed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    seqlen = q.shape[1]
    allowed = mask[:, None, None, :] & mask[:, None, :, None]
    if causal:
        allowed = allowed & torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
    allowed = allowed | ~mask[:, None, :, None]  # keep padded query rows finite; zeroed below
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed, enable_gqa=True).transpose(1, 2)
    return out * mask[:, :, None, None]


def padded_batch(batch, seqlen, heads_q, heads_kv, head_dim, dtype, pattern):
    q = torch.randn(batch, seqlen, heads_q, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(batch, seqlen, heads_kv, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(batch, seqlen, heads_kv, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    lengths = torch.randint(1, seqlen + 1, (batch,), device="cuda")
    positions = torch.arange(seqlen, device="cuda")[None, :]
    if pattern == "left":
        mask = positions >= seqlen - lengths[:, None]
    else:
        mask = positions < lengths[:, None]
        if pattern == "holes":
            mask &= (positions % 97) > 70  # gaps of 71 keys: longer than the span split
    mask[0] = True
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("pattern", ["right", "left", "holes"])
@pytest.mark.parametrize("causal", [False, True])
def test_padded_against_float64_sdpa(dtype, head_dim, pattern, causal):
    torch.manual_seed(head_dim)
    q, k, v, mask = padded_batch(4, 1031, 8, 2, head_dim, dtype, pattern)
    out = flash_attn_func(q, k, v, mask, causal=causal, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = sdpa_reference(*leaves, mask, causal)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    for name, actual, expected in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(actual).all(), name
        assert relative_error(actual, expected) < TOLERANCE[dtype], name  # fp32: exact dots by default


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_matches_sdpa_boolean_mask_in_same_dtype(dtype):
    q, k, v, mask = padded_batch(8, 2048, 32, 8, 128, dtype, "right")
    out = flash_attn_func(q, k, v, mask, backend="triton")
    ref = sdpa_reference(q.detach(), k.detach(), v.detach(), mask, False, dtype=dtype)
    rows = mask
    assert relative_error(out[rows], ref[rows]) < TOLERANCE[dtype]


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_at_scale(causal):
    torch.manual_seed(1)
    lengths = torch.randint(1, 2049, (24,)).tolist()
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    q, k, v = (
        torch.randn(sum(lengths), heads, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for heads in (32, 8, 8)
    )
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    for start, length in zip(cu[:-1].tolist(), lengths):
        if length > 300:  # spot-check a few long sequences against float64 SDPA
            continue
        rows = slice(start, start + length)
        leaves = [t.detach()[rows][None].double().requires_grad_() for t in (q, k, v)]
        ones = torch.ones(1, length, dtype=torch.bool, device="cuda")
        ref = sdpa_reference(*leaves, ones, causal)
        ref_grads = torch.autograd.grad(ref, leaves, dout[rows][None].double())
        assert relative_error(out[rows], ref[0]) < TOLERANCE[torch.bfloat16]
        assert relative_error(grads[0][rows], ref_grads[0][0]) < TOLERANCE[torch.bfloat16]


def test_deterministic_backward():
    q, k, v, mask = padded_batch(4, 777, 16, 2, 128, torch.bfloat16, "holes")
    out = flash_attn_func(q, k, v, mask, backend="triton", deterministic=True)
    dout = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
