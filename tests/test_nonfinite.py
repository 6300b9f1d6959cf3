"""One NaN/inf semantics on every backend: the reference, Triton (interpreter) and the CUDA kernels on
the CPU emulator run the same poisoned inputs (issue 8, item 4).

The semantics (README "Semantics"): a query row sees a key when the key is real (mask, own cu_seqlens
sequence), inside the window and the causal bound. Keys a row does not see never contribute, whatever
they hold: its output, lse and every gradient are the clean run's. Over the keys it sees, a row follows
IEEE arithmetic: a NaN in its q, a NaN in k of a seen key or a +inf score makes its output and lse NaN,
a NaN/inf in v of a seen key makes the output elements that use it NaN, and a row whose seen scores
are all -inf (or that sees none) outputs zeros with lse = -inf. Every non-finite result is NaN.

Each case is checked against the float64 oracle of the *clean* inputs: every value is either NaN or
the clean value, and the NaN positions are those of the reference backend (the semantic model, whose
own NaN positions the first tests pin down by hand).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from attention_cases import Case, key_padding_mask, offsets, run_public_api
from oracle import assert_close
from test_cuda_emulated import emulator  # noqa: F401  (the session fixture that builds the emulator)
from torch import Tensor

from llm2vec_fast import flash_attn_func

NAN, INF = float("nan"), float("inf")
DTYPE = torch.float16  # the CUDA kernels take float16/bfloat16, head dim 64/128
BATCH, SEQLEN, HEADS_Q, HEADS_KV, HEAD_DIM = 2, 40, 2, 1, 64
LENGTHS = [23, 17]


@pytest.fixture(autouse=True)
def fresh_inputs():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))


@dataclass
class Poisoned:
    """A clean case and the same case with some inputs overwritten by non-finite values."""

    name: str
    layout: str  # "padded" or "varlen"
    mask_kind: str = "none"
    causal: bool = False
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    poison: Callable[[Tensor, Tensor, Tensor, Tensor | None], None] = lambda q, k, v, mask: None
    masked_only: bool = True  # the poison sits where no row sees it: the outputs must be the clean ones
    clean: Case = field(init=False)
    case: Case = field(init=False)

    def build(self) -> Poisoned:
        options = dict(causal=self.causal, window_size=self.window_size, softcap=self.softcap)
        if self.layout == "padded":
            shape_q, shape_k = (BATCH, SEQLEN, HEADS_Q, HEAD_DIM), (BATCH, SEQLEN, HEADS_KV, HEAD_DIM)
            mask, cu = key_padding_mask(self.mask_kind, BATCH, SEQLEN), {}
        else:
            shape_q, shape_k = (sum(LENGTHS), HEADS_Q, HEAD_DIM), (sum(LENGTHS), HEADS_KV, HEAD_DIM)
            mask, cu = None, dict(cu_seqlens_q=offsets(LENGTHS), cu_seqlens_k=offsets(LENGTHS))
        q, k, v = torch.randn(shape_q).to(DTYPE), torch.randn(shape_k).to(DTYPE), torch.randn(shape_k).to(DTYPE)
        self.clean = Case(q, k, v, mask, **cu, **options)
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        self.poison(q2, k2, v2, mask)
        self.case = Case(q2, k2, v2, mask, **cu, **options)
        self.case.dout, self.case.dlse = self.clean.dout, self.clean.dlse
        return self


def _right_padded(mask: Tensor) -> int:
    """A padding position of the last sequence (key_padding_mask "right" pads its end)."""
    return int((~mask[-1]).nonzero()[0])


def _infinite_score_at_own_key(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    """q[1, 20, 0, 0] = +-inf with the sign of k[1, 20, 0, 0], so row 20 scores +inf at its own (real) key.

    A bare +inf would make every seen score -inf whenever the row's few windowed keys all have k < 0
    there (1 draw in 32), which is the zeros rule, not the NaN one this case is about."""
    assert mask is None or mask[1, 20]
    q[1, 20, 0, 0] = INF if k[1, 20, 0, 0] >= 0 else -INF


CASES = [
    # Poison where no row sees it.
    Poisoned("v nan at padding", "padded", "right", poison=lambda q, k, v, m: v[-1, _right_padded(m) :].fill_(NAN)),
    Poisoned("v inf at a hole", "padded", "holes", poison=lambda q, k, v, m: v[-1, ::3].fill_(INF)),
    Poisoned("k nan at a hole", "padded", "holes", poison=lambda q, k, v, m: k[0, 2:5].fill_(NAN)),
    Poisoned("k inf at padding", "padded", "left", poison=lambda q, k, v, m: k[0, :3].fill_(-INF)),
    # A window or the causal bound hides a key from some rows only: those rows stay clean.
    Poisoned(
        "v nan beyond some windows",
        "padded",
        window_size=(3, 3),
        poison=lambda q, k, v, m: v[:, 30].fill_(NAN),
        masked_only=False,
    ),
    Poisoned(
        "k nan beyond some windows",
        "padded",
        window_size=(3, 3),
        poison=lambda q, k, v, m: k[:, 30, :, 5].fill_(NAN),
        masked_only=False,
    ),
    Poisoned(
        "v nan in the future", "padded", causal=True, poison=lambda q, k, v, m: v[:, -2].fill_(NAN), masked_only=False
    ),
    Poisoned(
        "k row inf in the future",
        "padded",
        causal=True,
        poison=lambda q, k, v, m: k[:, -2].fill_(INF),
        masked_only=False,
    ),
    Poisoned("q nan on a padded row", "padded", "right", poison=lambda q, k, v, m: q[-1, _right_padded(m)].fill_(NAN)),
    Poisoned(
        "everything nan on a fully padded sequence",
        "padded",
        "empty_row",
        poison=lambda q, k, v, m: (q[-1].fill_(NAN), k[-1].fill_(NAN), v[-1].fill_(INF)),
    ),
    Poisoned(
        "softcap, inf in k at padding",
        "padded",
        "right",
        softcap=5.0,
        poison=lambda q, k, v, m: k[-1, _right_padded(m) :].fill_(INF),
    ),
    # Poison some rows see: those rows (or elements) are NaN, the others are clean.
    Poisoned("q nan", "padded", poison=lambda q, k, v, m: q[0, 7, 1, 3].fill_(NAN), masked_only=False),
    Poisoned(
        "q nan, causal", "padded", causal=True, poison=lambda q, k, v, m: q[0, 7, 1, 3].fill_(NAN), masked_only=False
    ),
    Poisoned(
        "q inf giving a +inf score, window",
        "padded",
        "holes",
        window_size=(5, 2),
        poison=_infinite_score_at_own_key,
        masked_only=False,
    ),
    Poisoned("q -inf", "padded", poison=lambda q, k, v, m: q[1, 3, 0, 9].fill_(-INF), masked_only=False),
    Poisoned("k row -inf", "padded", causal=True, poison=lambda q, k, v, m: k[0, 12].fill_(-INF), masked_only=False),
    Poisoned("k row +inf", "padded", "holes", poison=lambda q, k, v, m: k[1, 1].fill_(INF), masked_only=False),
    Poisoned(
        "v nan at a real key, causal",
        "padded",
        causal=True,
        poison=lambda q, k, v, m: v[0, 25, 0, 7].fill_(NAN),
        masked_only=False,
    ),
    Poisoned(
        "v inf at a real key, window",
        "padded",
        "holes",
        window_size=(4, 4),
        poison=lambda q, k, v, m: v[1, 19, 0, 2].fill_(INF),
        masked_only=False,
    ),
    Poisoned(
        "v nan in the neighbour sequence",
        "varlen",
        poison=lambda q, k, v, m: v[LENGTHS[0] + 2].fill_(NAN),
        masked_only=False,
    ),
    Poisoned(
        "q nan, varlen causal",
        "varlen",
        causal=True,
        poison=lambda q, k, v, m: q[4, 1, 0].fill_(NAN),
        masked_only=False,
    ),
    Poisoned(
        "k nan, varlen window",
        "varlen",
        window_size=(2, 6),
        poison=lambda q, k, v, m: k[30, 0, 1].fill_(NAN),
        masked_only=False,
    ),
]


# ---- the backends ---------------------------------------------------------------------------------


def public_api(backend: str) -> Callable[[Case], tuple[Tensor, ...]]:
    return lambda case: tuple(t.float() for t in run_public_api(case, backend, "cpu"))


def cuda_emulated(harness, deterministic: bool) -> Callable[[Case], tuple[Tensor, ...]]:
    def run(case: Case) -> tuple[Tensor, ...]:
        out, lse = harness.forward(case)
        return tuple(t.float() for t in (out, lse, *harness.backward(case, out, lse, deterministic, False)))

    return run


BACKENDS = ("reference", "triton", "cuda-atomic-dq", "cuda-deterministic")


def runner(name: str, request) -> Callable[[Case], tuple[Tensor, ...]]:
    if name.startswith("cuda"):
        return cuda_emulated(request.getfixturevalue("emulator"), name == "cuda-deterministic")
    return public_api(name)


def matrix(cases: list[Poisoned]) -> list:
    """(backend, case) pairs: every case on every backend, windowed and causal ones included (a
    window-edge tile keeps a non-finite value away from its rows that do not see it on CUDA too)."""
    return [pytest.param(name, case, id=f"{name}-{case.name}") for name in BACKENDS for case in cases]


# ---- the checks -------------------------------------------------------------------------------------

NAMES = ("out", "lse", "dq", "dk", "dv")


def assert_nan_or_clean(name: str, got: Tensor, clean: Tensor, nan_where: Tensor) -> None:
    """`got` is NaN exactly where `nan_where` says and the clean value everywhere else."""
    if not torch.equal(torch.isnan(got), nan_where):
        raise AssertionError(
            f"{name}: NaN at {int(torch.isnan(got).sum())} positions, expected {int(nan_where.sum())} "
            f"(first differing index {(torch.isnan(got) != nan_where).nonzero()[:1].tolist()})"
        )
    kept = ~nan_where
    if name == "lse":
        empty = clean == -INF
        assert torch.equal(got[kept] == -INF, empty[kept]), "lse: -inf exactly on the rows that see no key"
        kept = kept & ~empty
    if kept.any():
        assert_close(got[kept], clean[kept], torch.float32 if name == "lse" else DTYPE, name)


@pytest.mark.parametrize("backend_name,poisoned", matrix(CASES))
def test_nonfinite_semantics(request, backend_name, poisoned):
    poisoned.build()
    clean = poisoned.clean.oracle(with_dlse=False)
    got = runner(backend_name, request)(poisoned.case)
    if poisoned.masked_only:
        expected_nan = [torch.zeros_like(t, dtype=torch.bool) for t in clean]
    else:
        expected_nan = [torch.isnan(t) for t in public_api("reference")(poisoned.case)]
        assert any(mask.any() for mask in expected_nan), "the poison must reach some output"
    for name, value, reference, nan_where in zip(NAMES, got, clean, expected_nan):
        assert_nan_or_clean(name, value, reference.float(), nan_where)


def _all_scores_minus_inf(q, k, v, mask):
    k[..., 0] = k[..., 0].abs() + 0.5  # every key positive in dim 0 ...
    q[0, 8, 0, 0] = -INF  # ... so every score of this row is -inf


# Poison that changes finite values too (a -inf score drops its key; a soft cap maps inf to the cap):
# compared with the reference backend, NaN for NaN, -inf for -inf, values within the dtype's tolerance.
VALUE_CASES = [
    Poisoned("every seen score -inf", "padded", "holes", poison=_all_scores_minus_inf, masked_only=False),
    Poisoned(
        "softcap, inf in q",
        "padded",
        softcap=5.0,
        poison=lambda q, k, v, m: q[0, 5, 1, 1].fill_(INF),
        masked_only=False,
    ),
    Poisoned(
        "softcap, -inf in k, causal",
        "padded",
        causal=True,
        softcap=3.0,
        poison=lambda q, k, v, m: k[1, 9, 0, 4].fill_(-INF),
        masked_only=False,
    ),
    Poisoned(
        "inf in one k element, window",
        "padded",
        window_size=(6, 1),
        poison=lambda q, k, v, m: k[0, 17, 0, 3].fill_(INF),
        masked_only=False,
    ),
]


@pytest.mark.parametrize("backend_name,poisoned", matrix(VALUE_CASES))
def test_nonfinite_values_match_the_reference(request, backend_name, poisoned):
    poisoned.build()
    expected = public_api("reference")(poisoned.case)
    for name, value, reference in zip(NAMES, runner(backend_name, request)(poisoned.case), expected):
        assert_nan_or_clean(name, value, reference, torch.isnan(reference))


# ---- the semantic model itself, by hand ---------------------------------------------------------------


def reference_run(q, k, v, mask=None, **options) -> tuple[Tensor, ...]:
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = flash_attn_func(q, k, v, mask, return_lse=True, backend="reference", **options)
    return (out, lse, *torch.autograd.grad(out, (q, k, v), torch.randn_like(out)))


def qkv(seqlen: int = 12) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.randn(1, seqlen, 1, 16) for _ in range(3))


def test_reference_nan_in_q_poisons_its_row_and_the_keys_it_sees():
    q, k, v = qkv()
    q[0, 5, 0, 2] = NAN
    out, lse, dq, dk, dv = reference_run(q, k, v, causal=True)
    rows = torch.arange(12)
    assert torch.equal(torch.isnan(out[0, :, 0]).all(-1), rows == 5) and torch.isnan(lse[0, 0, 5])
    assert torch.isfinite(lse[0, 0, rows != 5]).all()
    assert torch.equal(torch.isnan(dq[0, :, 0]).any(-1), rows == 5)
    for grad in (dk, dv):  # keys 0..5 are seen by row 5; keys after it are not
        assert torch.equal(torch.isnan(grad[0, :, 0]).all(-1), rows <= 5)
        assert torch.isfinite(grad[0, 6:]).all()


def test_reference_nan_in_v_poisons_only_the_elements_that_use_it():
    q, k, v = qkv()
    v[0, 4, 0, 3] = NAN
    out, lse, *_ = reference_run(q, k, v, causal=True)
    expected = torch.zeros(12, 16, dtype=torch.bool)
    expected[4:, 3] = True  # rows 4.. see key 4; only column 3 uses the NaN
    assert torch.equal(torch.isnan(out[0, :, 0]), expected)
    assert torch.isfinite(lse).all()


def test_reference_plus_inf_score_is_nan_and_all_minus_inf_scores_give_zeros():
    q, k, v = qkv()
    k[0, :, 0, 0] = k[0, :, 0, 0].abs() + 0.5  # every key positive in dim 0
    q[0, 2, 0, 0] = INF  # row 2: every score +inf
    q[0, 8, 0, 0] = -INF  # row 8: every score -inf
    out, lse, *_ = reference_run(q, k, v)
    assert torch.isnan(out[0, 2]).all() and torch.isnan(lse[0, 0, 2])
    assert (out[0, 8] == 0).all() and lse[0, 0, 8] == -INF
    others = [i for i in range(12) if i not in (2, 8)]
    assert torch.isfinite(out[0, others]).all() and torch.isfinite(lse[0, 0, others]).all()


def test_reference_softcap_maps_infinite_scores_to_the_cap():
    q, k, v = qkv()
    q[0, 3, 0, 1] = INF
    out, lse, *_ = reference_run(q, k, v, softcap=4.0)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    scores = 4.0 * torch.tanh((q[0, 3, 0] @ k[0, :, 0].T) * 16**-0.5 / 4.0)
    assert torch.allclose(lse[0, 0, 3], torch.logsumexp(scores, 0))


# ---- softmax_scale: a documented range instead of a silent NaN ---------------------------------------


@pytest.mark.parametrize("scale", [1e30, 1e38, -1e38, 1e300, 2e6])
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_huge_softmax_scale_is_refused(scale, backend_name):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"softmax_scale must lie in \[-1e\+06, 1e\+06\]"):
        flash_attn_func(q, k, v, softmax_scale=scale, backend=backend_name)


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_largest_softmax_scale_gives_the_hard_argmax(backend_name):
    """At the bound the softmax is (numerically) a hard argmax over ordinary scores, never NaN."""
    q, k, v = qkv()
    out = flash_attn_func(q, k, v, softmax_scale=1e6, backend=backend_name)
    argmax = (q[0, :, 0] @ k[0, :, 0].T).argmax(-1)
    assert torch.allclose(out[0, :, 0], v[0, argmax, 0], atol=1e-5)
