"""The CPU fast path (backends/cpu.py, torch's fused CPU attention) against the float64 oracle and the reference.

Forward output, log-sum-exp and all three gradients over padded and packed layouts, GQA ratios, head
dims, odd lengths, fully padded rows, windows and causal bounds, fp32/fp16/bf16, every output buffer
NaN-poisoned first (attention_cases.check). The README's non-finite semantics hold because the fast
path hands every call the fused kernel would get wrong (non-finite inputs, overflowing scores) to the
reference: the whole matrix of tests/test_nonfinite.py runs on this backend too, and the tests below
pin down which calls take the fast path. Then "auto" on CPU tensors, and an encoder and a training
step whose results match the reference backend's.
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import MASK_KINDS, check, padded_case, run_public_api, varlen_case
from oracle import assert_close
from test_nonfinite import CASES, NAMES, VALUE_CASES, assert_nan_or_clean, public_api

from llm2vec_fast import flash_attn_func, flash_attn_varlen_func
from llm2vec_fast.attention_options import AttentionOptions
from llm2vec_fast.backends import cpu, reference, resolve_backend
from llm2vec_fast.encoder import LLM2Vec
from llm2vec_fast.tiny import build_tiny_model

NAN, INF = float("nan"), float("inf")


@pytest.fixture
def fast_path_only(monkeypatch):
    """Fail if a call reaches the reference backend: the fused kernel must compute it."""

    def refuse(*args, **kwargs):
        raise AssertionError("the cpu backend handed a call to the reference")

    monkeypatch.setattr(reference, "forward", refuse)
    monkeypatch.setattr(reference, "backward", refuse)


@pytest.fixture
def reference_calls(monkeypatch) -> list[str]:
    """Names of the reference functions the cpu backend called, in order."""
    calls: list[str] = []
    for name in ("forward", "backward"):
        original = getattr(reference, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(reference, name, counted)
    return calls


def check_cpu(case, with_dlse: bool = False) -> None:
    check(case, run_public_api(case, "cpu", "cpu", with_dlse=with_dlse), with_dlse)


# ---- against the float64 oracle, on the fused kernel ------------------------------------------------------

fused = pytest.mark.usefixtures("poisoned_outputs", "fast_path_only")


@fused
@pytest.mark.parametrize("seqlen", [1, 17, 64, 129])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_and_padding(seqlen, mask_kind, causal):
    check_cpu(padded_case(2, seqlen, seqlen, 2, 1, 32, torch.float32, mask_kind, causal=causal))


@fused
@pytest.mark.parametrize("heads_q,heads_kv", [(4, 4), (4, 2), (4, 1), (8, 1)])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gqa_ratios(heads_q, heads_kv, layout):
    if layout == "padded":
        check_cpu(padded_case(2, 33, 33, heads_q, heads_kv, 16, torch.float32, "holes"))
    else:
        check_cpu(varlen_case([5, 33, 12], [5, 33, 12], heads_q, heads_kv, 16, torch.float32))


@fused
@pytest.mark.parametrize("head_dim", [8, 24, 64, 80, 96, 128, 256])
def test_head_dims(head_dim):
    check_cpu(padded_case(1, 40, 40, 2, 1, head_dim, torch.float32, "right", causal=head_dim % 3 == 0))


@fused
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_dtypes(dtype, causal, layout):
    if layout == "padded":
        check_cpu(padded_case(2, 65, 65, 4, 2, 64, dtype, "holes", causal=causal))
    else:
        check_cpu(varlen_case([65, 3, 40], [65, 3, 40], 4, 2, 64, dtype, causal=causal))


@fused
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(17, 40), (40, 17)])
@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_lengths(seqlen_q, seqlen_k, causal):
    """Sq != Sk: the kernel's causal is top-left aligned, ours bottom-right (some rows then see no key)."""
    check_cpu(padded_case(2, seqlen_q, seqlen_k, 2, 1, 16, torch.float32, "right", causal=causal))


@fused
@pytest.mark.parametrize(
    "window_size,causal", [((5, 9), False), ((12, -1), True), ((-1, 3), False), ((0, 0), False), ((7, 7), True)]
)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_windows(window_size, causal, layout):
    options = dict(causal=causal, window_size=window_size)
    if layout == "padded":
        check_cpu(padded_case(2, 70, 70, 2, 1, 16, torch.float32, "holes", **options))
    else:
        check_cpu(varlen_case([1, 30, 70], [1, 30, 70], 2, 1, 16, torch.float32, **options))


@fused
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_uneven(causal):
    """Empty sequences, a sequence with keys but no queries and, causal, more keys than queries (rows seeing none)."""
    lengths_q = [1, 17, 0, 64, 29, 5, 4]
    lengths_k = [1, 17, 3, 64, 29, 9, 0] if causal else [1, 17, 0, 64, 29, 5, 4]
    check_cpu(varlen_case(lengths_q, lengths_k, 4, 2, 32, torch.float32, causal=causal))


def test_strided_inputs_and_zero_stride_gradient(poisoned_outputs, reference_calls):
    """(B, H, S, D).transpose(1, 2) inputs and out.sum()'s all-zero-stride gradient."""
    q, k, v = (torch.randn(2, heads, 21, 16).transpose(1, 2).requires_grad_() for heads in (4, 2, 2))
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1, 15:] = False
    flash_attn_func(q, k, v, mask, backend="cpu").sum().backward()
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    flash_attn_func(*leaves, mask, backend="reference").sum().backward()
    assert reference_calls == ["forward", "backward"], "only the reference run's own"
    for got, expected in zip((q, k, v), leaves):
        assert_close(got.grad, expected.grad, torch.float32, "grad")


@fused
@pytest.mark.parametrize("varlen", [False, True])
def test_custom_ops_with_a_last_stride_of_two(varlen):
    """The kernel reads a last stride other than 1 wrong (silently): such views reach the ops directly."""
    case = (
        varlen_case([6, 25], [6, 25], 2, 1, 16, torch.float32)
        if varlen
        else padded_case(2, 31, 31, 2, 1, 16, torch.float32, "holes")
    )
    q, k, v, dout = (torch.stack([t, torch.randn_like(t)], dim=-1)[..., 0] for t in (case.q, case.k, case.v, case.dout))
    assert q.stride(-1) == 2
    lengths = case.max_seqlens if varlen else (q.shape[1], k.shape[1])
    args = (case.key_mask, case.cu_seqlens_q, case.cu_seqlens_k, *lengths, False, -1, -1, 0.0, case.scale, False, "cpu")
    out, lse = torch.ops.llm2vec_fast.attention_forward(q, k, v, *args)
    grads = torch.ops.llm2vec_fast.attention_backward(dout, q, k, v, out, lse, None, *args)
    check(case, (out, lse, *grads))


def test_lse_gradient_goes_to_the_reference_backward(poisoned_outputs, reference_calls):
    """The kernel's backward takes no gradient of the lse: a loss on it is the reference backward's."""
    check_cpu(padded_case(2, 37, 37, 2, 1, 16, torch.float32, "empty_row"), with_dlse=True)
    check_cpu(varlen_case([9, 0, 20], [9, 0, 20], 2, 1, 16, torch.float32), with_dlse=True)
    assert reference_calls == ["backward", "backward"]


@pytest.mark.parametrize("threads", [1, 2])
def test_backward_is_deterministic(threads):
    """Bitwise the same twice, with several threads too (GQA: each KV head's gradient sums 4 query heads)."""
    case = varlen_case([150, 7, 133], [150, 7, 133], 8, 2, 32, torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        first, second = (run_public_api(case, "cpu", "cpu", deterministic=True) for _ in range(2))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---- non-finite values: the reference decides --------------------------------------------------------------


def fast_path_or_auto(poisoned) -> str:
    """The cpu backend, or "auto" for the softcap cases (which it refuses, so that "auto" takes the reference)."""
    return "auto" if poisoned.softcap else "cpu"


@pytest.mark.parametrize("poisoned", CASES, ids=[case.name for case in CASES])
def test_nonfinite_semantics(poisoned, reference_calls):
    poisoned.build()
    clean = poisoned.clean.oracle(with_dlse=False)
    got = public_api(fast_path_or_auto(poisoned))(poisoned.case)
    if poisoned.masked_only:
        expected_nan = [torch.zeros_like(t, dtype=torch.bool) for t in clean]
    else:
        expected_nan = [torch.isnan(t) for t in public_api("reference")(poisoned.case)]
    for name, value, expected, nan_where in zip(NAMES, got, clean, expected_nan):
        assert_nan_or_clean(name, value, expected.float(), nan_where)
    assert reference_calls[:2] == ["forward", "backward"], "non-finite inputs must be the reference's"


@pytest.mark.parametrize("poisoned", VALUE_CASES, ids=[case.name for case in VALUE_CASES])
def test_nonfinite_values_match_the_reference(poisoned):
    poisoned.build()
    expected = public_api("reference")(poisoned.case)
    for name, value, reference_value in zip(NAMES, public_api(fast_path_or_auto(poisoned))(poisoned.case), expected):
        assert_nan_or_clean(name, value, reference_value, torch.isnan(reference_value))


def test_the_fused_kernel_alone_would_be_wrong_on_a_nan_row():
    """Why non-finite inputs are the reference's: the kernel returns zeros, not NaN, for a row with a NaN score."""
    q, k, v = (torch.randn(1, 1, 8, 16) for _ in range(3))
    q[0, 0, 3, 0] = NAN
    out, _ = cpu._FORWARD(q, k, v, 0.0, False, scale=0.25)
    assert not torch.isnan(out[0, 0, 3]).any()
    expected = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=0.25, backend="reference")
    assert torch.isnan(expected[0, 3]).all()
    got = flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=0.25, backend="cpu")
    assert torch.equal(torch.isnan(got), torch.isnan(expected))


def test_scores_that_could_overflow_go_to_the_reference(reference_calls):
    """Finite inputs whose scores may exceed float32 (here +inf at row 2): the reference's NaN, not the kernel's 0."""
    q, k, v = (torch.randn(1, 8, 1, 16) for _ in range(3))
    k[0, :, 0, 0] = k[0, :, 0, 0].abs() + 0.5
    q[0, 2, 0, 0] = 3e38
    out = flash_attn_func(q, k, v, softmax_scale=1e6, backend="cpu")
    assert reference_calls == ["forward"]
    assert torch.isnan(out[0, 2]).all() and torch.isfinite(out[0, [0, 1, 3, 4, 5, 6, 7]]).all()


def test_a_nonfinite_gradient_goes_to_the_reference_backward(reference_calls):
    q, k, v = (torch.randn(1, 12, 2, 16, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, 12, 2, 16)
    dout[0, 4, 1, 3] = INF
    out = flash_attn_func(q, k, v, backend="cpu")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    expected = torch.autograd.grad(flash_attn_func(*leaves, backend="reference"), leaves, dout)
    assert reference_calls == ["backward", "forward", "backward"]
    for got, want in zip(grads, expected):
        assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got).any()


# ---- the choice -------------------------------------------------------------------------------------------


def test_auto_picks_the_fast_path_on_cpu_unless_softcap():
    q = torch.randn(1, 8, 2, 16)
    assert resolve_backend(q, q) == "cpu"
    assert resolve_backend(q, q, "auto", AttentionOptions(causal=True, window=(3, 3))) == "cpu"
    assert resolve_backend(q, q, "auto", AttentionOptions(softcap=5.0)) == "reference"
    assert resolve_backend(q, q, "reference") == "reference"


def test_forcing_it_with_softcap_says_why():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="'cpu' cannot run these inputs: .* no softcap"):
        flash_attn_func(q, q, q, softcap=5.0, backend="cpu")


def test_gqa_goes_to_the_reference_where_the_kernel_lacks_it(monkeypatch):
    monkeypatch.setattr(cpu, "_native_gqa", lambda: False)
    q, k = torch.randn(1, 8, 4, 16), torch.randn(1, 8, 2, 16)
    assert resolve_backend(q, k) == "reference"
    assert resolve_backend(q, q) == "cpu"
    with pytest.raises(ValueError, match="has no GQA"):
        resolve_backend(q, k, "cpu")


def test_varlen_public_api_runs_on_it(fast_path_only):
    q = torch.randn(30, 4, 16)
    cu = torch.tensor([0, 10, 30], dtype=torch.int32)
    out = flash_attn_varlen_func(q, q, q, cu, cu, 20, 20)  # auto
    expected = torch.cat(
        [flash_attn_func(q[None, a:b], q[None, a:b], q[None, a:b], backend="cpu")[0] for a, b in ((0, 10), (10, 30))]
    )
    assert torch.equal(out, expected)


# ---- through a model --------------------------------------------------------------------------------------

TEXTS = [
    "A man is playing a guitar on the street.",
    "Paris",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. " * 3,
    "",
    ["Retrieve documents that answer the question:", "What is the capital of France?"],
]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_encoder_embeddings_match_the_reference_backend(family, tmp_path):
    model, tokenizer = build_tiny_model(family, seed=5)
    model.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    embeddings = {}
    for backend in ("cpu", "reference"):
        encoder = LLM2Vec.from_pretrained(str(tmp_path), attention_backend=backend)
        embeddings[backend] = encoder.encode(TEXTS, batch_size=2, show_progress_bar=False)
    assert_close(embeddings["cpu"], embeddings["reference"], torch.float32, "embeddings")


def test_training_gradients_match_the_reference_backend():
    """A packed forward and backward through a bidirectional model: every weight gradient as the reference's."""
    from llm2vec_fast.hf import enable_bidirectional, pack_sequences

    grads = {}
    for backend in ("cpu", "reference"):
        model, _ = build_tiny_model("llama", seed=7)
        enable_bidirectional(model.model, backend=backend)
        packed = pack_sequences([[5, 9, 11, 3], list(range(20, 47)), [8]])
        hidden = model.model(**packed.model_inputs()).last_hidden_state
        (hidden * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
        grads[backend] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads["cpu"].keys() == grads["reference"].keys() and grads["cpu"]
    for name, grad in grads["cpu"].items():
        assert_close(grad, grads["reference"][name], torch.float32, name)
