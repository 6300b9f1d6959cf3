"""The Triton backward's two paths against the float64 oracle: the fused 5-GEMM kernel (the default: dQ
added with fp32 atomics) and the deterministic pair (``deterministic=True``: dK/dV, then dQ), both walking
every query head of a KV head's GQA group. Inputs are fresh and random, outputs NaN-poisoned before the
kernels run (attention_cases.check says what is compared).

Masks apply on edge tiles only: a full key tile meets the query tiles inside its window and span without
pair masks, padding query rows reading as zeros there. The poisoned-padding case pins that down: NaN in
q and dO of padding rows that sit inside such a tile must leave every gradient clean.
"""

from __future__ import annotations

import copy

import pytest
import torch
from attention_cases import check, key_padding_mask, padded_case, run_public_api, varlen_case

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

CASES = {
    "gqa8-holes": lambda: padded_case(1, 40, 40, 8, 1, 16, torch.float32, "holes"),
    "gqa4-window-softcap": lambda: padded_case(
        1, 70, 70, 4, 1, 16, torch.float32, "left", window_size=(9, 5), softcap=3.0
    ),
    "gqa2-varlen-empty-causal": lambda: varlen_case(
        [0, 33, 5, 0, 40], [0, 33, 9, 2, 40], 4, 2, 16, torch.float32, causal=True
    ),
    "gqa2-bf16-right": lambda: padded_case(2, 65, 65, 2, 1, 64, torch.bfloat16, "right"),
    "gqa2-window-unmasked": lambda: padded_case(2, 100, 100, 2, 1, 16, torch.float32, "none", window_size=(80, 40)),
    # Head dims over 128: the dK/dV kernel splits the head dim over two programs per key tile (dkdv_split);
    # 160 pads to 256, so the second program's columns are partly masked.
    "gqa2-d256-bf16-holes": lambda: padded_case(1, 40, 40, 2, 1, 256, torch.bfloat16, "holes"),
    "gqa2-d160-varlen-window-softcap": lambda: varlen_case(
        [0, 37, 4], [0, 37, 9], 2, 1, 160, torch.float32, window_size=(9, 5), softcap=3.0
    ),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_both_backward_paths_match_the_oracle(kernel_device, name, deterministic):
    case = CASES[name]()
    check(case, run_public_api(case, "triton", kernel_device, deterministic, with_dlse=True), with_dlse=True)


@pytest.mark.parametrize("name", ["gqa8-holes", "gqa2-varlen-empty-causal", "gqa2-d256-bf16-holes"])
def test_deterministic_backward_is_bitwise_reproducible(kernel_device, name):
    """Across the GQA group walk and packed sequences (empty ones too), two calls give the same bits."""
    case = CASES[name]()
    first = run_public_api(case, "triton", kernel_device, deterministic=True, with_dlse=True)
    second = run_public_api(case, "triton", kernel_device, deterministic=True, with_dlse=True)
    for what, one, other in zip(("dq", "dk", "dv"), first[2:], second[2:]):
        assert torch.equal(one, other), f"{what}: the deterministic backward differs between two calls"


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_padding_rows_inside_unmasked_tiles_stay_out(kernel_device, deterministic):
    """Holes of padding inside one span (no gap long enough to split it): the full key tile at the end of the
    row meets the query tile holding the hole unmasked. NaN q and dO there must reach no gradient."""
    case = padded_case(2, 64, 64, 4, 2, 16, torch.float16, "holes")
    assert key_padding_mask("holes", 2, 64)[0, 32:].all(), "the second key tile of row 0 must be full"
    poisoned = copy.copy(case)
    padding = ~case.key_mask
    poisoned.q = case.q.masked_fill(padding[:, :, None, None], float("nan"))
    poisoned.dout = case.dout.masked_fill(padding[:, :, None, None], float("nan"))
    check(case, run_public_api(poisoned, "triton", kernel_device, deterministic, with_dlse=True), with_dlse=True)


@pytest.mark.parametrize("column", [3, 200], ids=["first-half", "second-half"])
def test_head_dim_split_poisons_the_keys_a_nan_row_sees_in_both_halves(kernel_device, column):
    """At head dim 256 each dK/dV program accumulates half of the columns. A NaN in one column of q of a row
    inside a window poisons dK and dV at every key the row sees, in both halves, and nothing at the keys of
    the same tile it does not see (the exact redo): in the program whose half of q holds the NaN and in the
    one whose half does not."""
    case = padded_case(1, 40, 40, 2, 1, 256, torch.float32, "none", window_size=(6, 4))
    case.q[0, 20, 1, column] = float("nan")
    got = run_public_api(case, "triton", kernel_device, deterministic=True)
    expected = run_public_api(case, "reference", "cpu")
    assert expected[3].isnan().any() and not expected[3].isnan().all(), "dk: the case must poison some keys only"
    for what, one, other in zip(("out", "lse", "dq", "dk", "dv"), got, expected):
        one = one.cpu()
        assert torch.equal(one.isnan(), other.isnan()), f"{what}: NaN positions differ from the reference"
        finite = ~other.isnan()
        error = (one[finite].double() - other[finite].double()).norm() / other[finite].double().norm()
        assert error < 1e-5, f"{what}: relative error {error:.2e}"
