"""The Hopper backward of csrc/ (flash_attn/hopper/bwd_sm90.cuh, sm_90a), run unchanged on the CPU emulator.

As test_cuda_emulated_sm90.py does for the Hopper forward: the kernel source compiled as host C++ against
the emulated sm_90 instructions (TMA, mbarrier phases and transaction bytes, wgmma from shared-memory
descriptors and from registers, named barriers) with their ordering checks, glue mirroring what
csrc/flash_api.cpp does on an sm_90 GPU (harness_sm90_bwd.cpp): the Hopper forward, then the sm80
preprocess and the Hopper dK/dV kernel adding dQ with float atomics, dQ scaled and cast as the binding does.
Gradients are compared with the float64 oracle over the same matrix as the forward's tests (padding
patterns, lengths, GQA, head dims, dtypes, varlen, windows, soft caps, dlse, strided inputs) and the
non-finite cases of test_nonfinite.py; one test checks that deterministic=True keeps the sm80 path.
What it cannot show: timing, the tensor cores' rounding, the hardware's ordering of the atomics.
"""

from __future__ import annotations

import os

import pytest
import torch
from attention_cases import MASK_KINDS, Case, padded_case, varlen_case
from test_cuda_emulated import EmulatedKernels, build_emulator
from test_cuda_emulated_sm90 import HopperLibrary
from test_nonfinite import CASES, NAMES, VALUE_CASES, assert_nan_or_clean, cuda_emulated, public_api


@pytest.fixture(scope="session")
def hopper(tmp_path_factory) -> EmulatedKernels:
    """emu_forward and emu_backward are the Hopper kernels' (the backward's deterministic path stays on the
    sm80 kernels, as in the binding)."""
    library = build_emulator(tmp_path_factory.mktemp("cuda_emulator_sm90_bwd"), "harness_sm90_bwd.cpp")
    return EmulatedKernels(
        HopperLibrary(library, {"emu_forward": "emu_forward_sm90", "emu_backward": "emu_backward_sm90"})
    )


@pytest.fixture(autouse=True)
def fresh_inputs():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))


@pytest.mark.parametrize("seqlen", [1, 17, 129])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_and_padding(hopper, seqlen, mask_kind, causal):
    hopper.run(padded_case(2, seqlen, seqlen, 2, 1, 64, torch.float16, mask_kind, causal=causal))


@pytest.mark.parametrize("mask_kind", ["none", "holes"])
@pytest.mark.parametrize("causal", [False, True])
def test_several_tiles_per_block(hopper, mask_kind, causal):
    """300 tokens: five query tiles per key tile (the Q/dO ring wrapping its stages), three key tiles."""
    hopper.run(padded_case(1, 300, 300, 1, 1, 64, torch.bfloat16, mask_kind, causal=causal))


@pytest.mark.parametrize("heads_q,heads_kv", [(2, 2), (4, 2), (4, 1)])
def test_gqa_ratios(hopper, heads_q, heads_kv):
    """A block walks every query head of its kv head's group: dK and dV reduced over it in registers."""
    hopper.run(padded_case(1, 70, 70, heads_q, heads_kv, 128, torch.bfloat16, "holes"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_dtypes_and_head_dims(hopper, dtype, head_dim):
    hopper.run(padded_case(2, 100, 100, 2, 1, head_dim, dtype, "right", causal=True))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_uneven_lengths(hopper, causal, head_dim):
    lengths = [1, 0, 17, 130, 64]
    hopper.run(varlen_case(lengths, lengths, 2, 1, head_dim, torch.bfloat16, causal=causal))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_cross_lengths(hopper, causal):
    """Query and key lengths differ per sequence (bottom-right causal alignment), one key set empty."""
    hopper.run(varlen_case([5, 70, 33, 8], [40, 3, 33, 0], 2, 1, 64, torch.float16, causal=causal))


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(40, 100), (100, 40)])
def test_cross_attention_with_key_mask(hopper, seqlen_q, seqlen_k):
    """seqlen_q != seqlen_k: the mask marks keys only, query rows are all real."""
    hopper.run(padded_case(2, seqlen_q, seqlen_k, 2, 2, 64, torch.bfloat16, "holes", causal=True))


@pytest.mark.parametrize(
    "window_size,softcap", [((16, 0), 0.0), ((8, 8), 0.0), ((-1, 4), 0.0), ((-1, -1), 5.0), ((20, 3), 2.0)]
)
def test_window_and_softcap(hopper, window_size, softcap):
    case = padded_case(2, 90, 90, 2, 1, 64, torch.float16, "holes", window_size=window_size, softcap=softcap)
    hopper.run(case)


def test_lse_gradient(hopper):
    """The gradient of lse enters through delta, which the kernel reads per query column."""
    hopper.run(padded_case(2, 77, 77, 2, 1, 64, torch.float16, "empty_row"), with_dlse=True)
    hopper.run(varlen_case([30, 0, 50], [30, 0, 50], 2, 2, 128, torch.bfloat16), with_dlse=True)


def test_deterministic_path_stays_on_sm80(hopper):
    """deterministic=True runs the sm80 dK/dV and dQ kernels (no atomics), still exact next to the Hopper forward."""
    hopper.run(varlen_case([30, 0, 50], [30, 0, 50], 2, 1, 64, torch.float16, causal=True), deterministic=True)


def test_strided_inputs_and_custom_scale(hopper):
    """Inputs as (B, H, S, D) transposes and head slices of a wider tensor: the tensor maps take their strides."""
    batch, seqlen, heads, head_dim = 2, 50, 2, 64
    q = torch.randn(batch, heads, seqlen, head_dim).to(torch.float16).transpose(1, 2)
    kv = torch.randn(batch, seqlen, 2, 2, head_dim).to(torch.float16)  # k and v interleaved per token
    case = Case(
        q,
        kv[:, :, 0],
        kv[:, :, 1],
        padded_case(batch, 1, seqlen, 1, 1, 64, torch.float16, "left").key_mask,
        causal=True,
        softmax_scale=0.3,
    )
    assert not case.q.is_contiguous() and not case.k.is_contiguous()
    hopper.run(case)


def test_key_tile_fully_padded(hopper):
    """Left padding over a whole 128-key tile and a hole spanning one: their dK and dV come out zero, no
    query tile of theirs is loaded, and the dQ of the real rows misses nothing."""
    case = padded_case(2, 300, 300, 1, 1, 128, torch.float16)
    case.key_mask = torch.ones(2, 300, dtype=torch.bool)
    case.key_mask[0, :200] = False
    case.key_mask[1, 64:256] = False
    hopper.run(case)


# ---- non-finite inputs (test_nonfinite.py's cases): TMA loads padded and out-of-sequence rows of Q, dO, K
# and V as they are, so 0 * NaN reaches the accumulators and the exact slow paths (dQ elements, dK/dV rows)
# must repair every gradient that does not see the poison.


@pytest.mark.parametrize("poisoned", [pytest.param(case, id=case.name) for case in CASES])
def test_nonfinite_semantics(hopper, poisoned):
    poisoned.build()
    clean = poisoned.clean.oracle(with_dlse=False)
    got = cuda_emulated(hopper, deterministic=False)(poisoned.case)
    if poisoned.masked_only:
        expected_nan = [torch.zeros_like(t, dtype=torch.bool) for t in clean]
    else:
        expected_nan = [torch.isnan(t) for t in public_api("reference")(poisoned.case)]
    for name, value, reference, nan_where in zip(NAMES, got, clean, expected_nan):
        assert_nan_or_clean(name, value, reference.float(), nan_where)


@pytest.mark.parametrize("poisoned", [pytest.param(case, id=case.name) for case in VALUE_CASES])
def test_nonfinite_values_match_the_reference(hopper, poisoned):
    poisoned.build()
    expected = public_api("reference")(poisoned.case)
    for name, value, reference in zip(NAMES, cuda_emulated(hopper, deterministic=False)(poisoned.case), expected):
        assert_nan_or_clean(name, value, reference, torch.isnan(reference))
