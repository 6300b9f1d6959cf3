"""Public API contracts: validation errors, backend choice, custom-op registration, torch.compile,
and the padding helpers. Runs on the exact PyTorch reference backend (CPU) unless stated."""

import os
import subprocess
import sys

import pytest
import torch
from oracle import assert_close, attention_oracle, varlen_oracle

import llm2vec_fast
from llm2vec_fast import flash_attn_func, flash_attn_varlen_func, pad_input, resolve_backend, unpad_input


def qkv(batch=2, seqlen=9, heads_q=4, heads_kv=2, head_dim=16, dtype=torch.float32, requires_grad=False):
    return tuple(
        torch.randn(batch, seqlen, heads, head_dim, dtype=dtype, requires_grad=requires_grad)
        for heads in (heads_q, heads_kv, heads_kv)
    )


def packed(lengths=(3, 5, 1), heads_q=4, heads_kv=2, head_dim=16):
    total = sum(lengths)
    cu = torch.tensor((0, *lengths), dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(total, heads_q, head_dim)
    k, v = torch.randn(total, heads_kv, head_dim), torch.randn(total, heads_kv, head_dim)
    return q, k, v, cu, max(lengths)


# ----- the reference backend against the oracle (the CPU path every Hugging Face test relies on)


@pytest.mark.parametrize("mask_kind", ["none", "left", "holes"])
@pytest.mark.parametrize("causal", [False, True])
def test_reference_backend_matches_oracle(mask_kind, causal):
    q, k, v = qkv(seqlen=13, requires_grad=True)
    mask = None
    if mask_kind != "none":
        mask = torch.ones(2, 13, dtype=torch.bool)
        mask[0, :4] = False
        if mask_kind == "holes":
            mask[1, 5:8] = False
    out, lse = flash_attn_func(
        q, k, v, mask, causal=causal, return_lse=True, backend="reference", window_size=(6, 4), softcap=3.0
    )
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_oracle(*leaves, key_mask=mask, causal=causal, window_size=(6, 4), softcap=3.0)
    assert_close(out, ref_out, torch.float32, "out")
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    for grad, ref in zip(grads, torch.autograd.grad(ref_out, leaves, dout.double())):
        assert_close(grad, ref, torch.float32, "grad")


def test_reference_varlen_matches_oracle():
    q, k, v, cu, max_len = packed(lengths=(3, 0, 7, 1))
    out = flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
    ref, _ = varlen_oracle(q, k, v, cu, cu, causal=True)
    assert_close(out, ref, torch.float32, "out")


def test_fully_padded_sequence_gives_zeros_and_zero_gradients():
    q, k, v = qkv(requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1] = False
    out, lse = flash_attn_func(q, k, v, mask, return_lse=True)
    assert out[1].abs().max() == 0 and torch.isneginf(lse[1]).all()
    out.sum().backward()
    for tensor in (q, k, v):
        assert torch.isfinite(tensor.grad).all()
        assert tensor.grad[1].abs().max() == 0


def test_integer_mask_equals_bool_mask():
    q, k, v = qkv()
    mask = torch.ones(2, 9, dtype=torch.int64)
    mask[0, 6:] = 0
    torch.testing.assert_close(flash_attn_func(q, k, v, mask), flash_attn_func(q, k, v, mask.bool()))


# ----- validation: every bad input names its problem


@pytest.mark.parametrize(
    "mutate,error,message",
    [
        (lambda q, k, v: (q.double(), k.double(), v.double()), TypeError, "float64"),
        (lambda q, k, v: (q, k.half(), v), TypeError, "share one dtype"),
        (lambda q, k, v: (q[0], k, v), ValueError, "rank 4"),
        (
            lambda q, k, v: (q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1)),
            ValueError,
            "multiple",
        ),
        (lambda q, k, v: (q[..., :12], k[..., :12], v[..., :12]), ValueError, "head_dim"),
        (lambda q, k, v: (q, k, v[:, :5]), ValueError, "same shape"),
        (lambda q, k, v: (q[:1], k, v), ValueError, "batch size"),
        (lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError, "head_dim"),
        (lambda q, k, v: (q.tolist(), k, v), TypeError, "torch.Tensor"),
    ],
)
def test_bad_qkv(mutate, error, message):
    with pytest.raises(error, match=message):
        flash_attn_func(*mutate(*qkv()))


def test_bad_head_dim_beyond_limit():
    q, k, v = qkv(head_dim=264)
    with pytest.raises(ValueError, match="head_dim 264"):
        flash_attn_func(q, k, v)


@pytest.mark.parametrize(
    "mask,error,message",
    [
        (torch.ones(2, 8, dtype=torch.bool), ValueError, r"\(batch, seqlen_k\)"),
        (torch.ones(2, 9, 1, dtype=torch.bool), ValueError, r"\(batch, seqlen_k\)"),
        (torch.zeros(2, 9), TypeError, "additive float masks"),
        ([[1] * 9] * 2, TypeError, "torch.Tensor"),
    ],
)
def test_bad_mask(mask, error, message):
    with pytest.raises(error, match=message):
        flash_attn_func(*qkv(), attention_mask=mask)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(window_size=(3,)), "window_size"),
        (dict(window_size=(-2, 0)), "window_size"),
        (dict(softcap=-1.0), "softcap"),
        (dict(softcap=float("nan")), "softcap"),
    ],
)
def test_bad_window_or_softcap(kwargs, message):
    with pytest.raises(ValueError, match=message):
        flash_attn_func(*qkv(), **kwargs)


def test_bad_softmax_scale():
    with pytest.raises(TypeError, match="softmax_scale"):
        flash_attn_func(*qkv(), softmax_scale=float("inf"))


@pytest.mark.parametrize(
    "change,error,message",
    [
        (lambda cu, m: (cu.long(), cu, m, m), TypeError, "cu_seqlens_q must be int32"),
        (lambda cu, m: (cu, cu[:-1], m, m), ValueError, "same number of sequences"),
        (lambda cu, m: (cu.flip(0), cu.flip(0), m, m), ValueError, "start at 0"),
        (lambda cu, m: (torch.tensor([0, 5, 3, 9], dtype=torch.int32),) * 2 + (m, m), ValueError, "non-decreasing"),
        (lambda cu, m: (torch.tensor([0, 3, 8, 8], dtype=torch.int32),) * 2 + (m, m), ValueError, "ends at 8"),
        (lambda cu, m: (cu, cu, m - 1, m), ValueError, "longer than max_seqlen"),
        (lambda cu, m: (cu, cu, -1, m), TypeError, "max_seqlen_q"),
        (lambda cu, m: (cu, cu, float(m), m), TypeError, "max_seqlen_q"),
        (lambda cu, m: (cu[None], cu[None], m, m), ValueError, "1-D"),
    ],
)
def test_bad_varlen_arguments(change, error, message):
    q, k, v, cu, max_len = packed()
    with pytest.raises(error, match=message):
        flash_attn_varlen_func(q, k, v, *change(cu, max_len))


def test_changed_offsets_are_checked_again():
    """The per-tensor memo of checked offsets must not hide an in-place edit."""
    q, k, v, cu, max_len = packed()
    flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len)
    cu[2] = 1
    with pytest.raises(ValueError, match="non-decreasing"):
        flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len)


def test_varlen_rank_checked():
    q, k, v, cu, max_len = packed()
    with pytest.raises(ValueError, match="rank 3"):
        flash_attn_varlen_func(q[None], k, v, cu, cu, max_len, max_len)


# ----- backend choice


def test_auto_uses_the_cpu_fast_path_on_cpu():
    q, k, _ = qkv()
    assert resolve_backend(q, k) == "cpu"
    assert resolve_backend(q, k, "auto") == "cpu"


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'"):
        flash_attn_func(*qkv(), backend="flash3")


def test_environment_variable_forces_backend(monkeypatch):
    monkeypatch.setenv(llm2vec_fast.BACKEND_ENV_VAR, "no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        flash_attn_func(*qkv())


def test_forcing_triton_on_cpu_without_interpreter_explains():
    code = (
        "import torch, llm2vec_fast as L\n"
        "q = torch.randn(1, 4, 2, 16)\n"
        "try:\n"
        "    L.flash_attn_func(q, q, q, backend='triton')\n"
        "except (RuntimeError, ValueError) as error:\n"
        "    print(error)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "triton" in result.stdout and ("CUDA" in result.stdout or "TRITON_INTERPRET" in result.stdout), result


# ----- custom ops, autograd and torch.compile


def test_opcheck_forward_and_backward():
    q, k, v = qkv(requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    args = (q, k, v, mask, None, None, 9, 9, False, -1, -1, 0.0, 0.25, False, "reference")
    torch.library.opcheck(torch.ops.llm2vec_fast.attention_forward.default, args)
    q2, k2, v2, cu, max_len = packed()
    varlen_args = (q2, k2, v2, None, cu, cu, max_len, max_len, True, -1, -1, 0.0, 0.25, False, "reference")
    torch.library.opcheck(torch.ops.llm2vec_fast.attention_forward.default, varlen_args)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_fullgraph(backend):
    q, k, v = qkv(requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False

    def loss_fn(q, k, v, mask):
        return flash_attn_func(q, k, v, mask, backend=backend).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    eager_loss = loss_fn(q, k, v, mask)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    compiled_loss = compiled(q, k, v, mask)
    compiled_grads = torch.autograd.grad(compiled_loss, (q, k, v))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_torch_compile_varlen():
    q, k, v, cu, max_len = packed()
    compiled = torch.compile(flash_attn_varlen_func, fullgraph=True)
    torch.testing.assert_close(
        compiled(q, k, v, cu, cu, max_len, max_len), flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len)
    )


# ----- padding helpers


def test_unpad_pad_round_trip_and_gradients():
    hidden = torch.randn(3, 6, 5, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 1, 1]])
    packed_tokens, indices, cu_seqlens, max_seqlen = unpad_input(hidden, mask)
    assert cu_seqlens.tolist() == [0, 3, 7, 11] and cu_seqlens.dtype == torch.int32 and max_seqlen == 4
    torch.testing.assert_close(packed_tokens, hidden[mask.bool()])
    padded = pad_input(packed_tokens, indices, 3, 6)
    torch.testing.assert_close(padded, hidden * mask[..., None])
    padded.sum().backward()
    torch.testing.assert_close(hidden.grad, mask[..., None].float().expand_as(hidden))


def test_unpad_rejects_mismatched_mask():
    with pytest.raises(ValueError, match=r"\(batch, seqlen\)"):
        unpad_input(torch.randn(2, 5, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="indices"):
        pad_input(torch.randn(3, 2), torch.arange(4), 2, 2)
