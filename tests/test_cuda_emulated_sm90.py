"""The Hopper kernels of csrc/ (flash_attn/hopper/, sm_90a), run unchanged on the CPU emulator: the case matrix
both the Hopper forward and the Hopper backward are checked over.

The kernel source is compiled as host C++ against the emulated sm_90 instructions of
tests/cuda_emulator/emulator_sm90.h (TMA with the 128-byte swizzle and out-of-bounds fill, mbarrier
phases and transaction bytes, wgmma from shared-memory descriptors and from registers, setmaxnreg,
named barriers), with its ordering checks: a TMA box read before its barrier's phase, a stage
overwritten while a wgmma reads it, an accumulator touched in flight, a pingpong turn taken out of
order, each fails the launch. The persistent forward grid runs on 3 blocks, so that blocks take several
work tiles. The glue is test_cuda_emulated.py's, with the Hopper entry points of harness_sm90_bwd.cpp
standing in for the sm80 ones. Every case runs on two harnesses (the `hopper` fixture's parameters):
the Hopper forward with the sm80 backward, whose checks against the float64 oracle cover this forward's
out and its lse (through delta and the recomputed P), and the Hopper forward with the Hopper backward
(as csrc/flash_api.cpp runs on an sm_90 GPU: atomic dQ, or deterministic=True on the dK/dV and dQ kernels),
over padding patterns, lengths, GQA, head dims, dtypes, varlen, windows, soft caps, dlse, strided inputs
and test_nonfinite.py's cases. tests/test_cuda_emulated_sm90_bwd.py adds the Hopper backward's own tests.
What it cannot show: timing, the tensor cores' rounding, the hardware's ordering of the atomics.
"""

from __future__ import annotations

import ctypes
import os

import pytest
import torch
from attention_cases import MASK_KINDS, Case, padded_case, varlen_case
from test_cuda_emulated import EmulatedKernels, build_emulator
from test_nonfinite import CASES, NAMES, VALUE_CASES, assert_nan_or_clean, cuda_emulated, public_api

# EmulatedKernels' entry points -> the Hopper kernels' that stand in for them, per harness.
HARNESSES = {
    "sm80_backward": {"emu_forward": "emu_forward_sm90"},
    "hopper_backward": {"emu_forward": "emu_forward_sm90", "emu_backward": "emu_backward_sm90"},
}


class HopperLibrary:
    """An emulator library whose entry points `renamed` (EmulatedKernels' name -> the Hopper kernel's) stand
    in for the sm80 ones; the others pass through."""

    def __init__(self, library: ctypes.CDLL, renamed: dict[str, str]):
        self._library = library
        self._renamed = renamed

    def __getattr__(self, name: str):
        return getattr(self._library, self._renamed.get(name, name))


_BUILT: list[ctypes.CDLL] = []


def hopper_library(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """harness_sm90_bwd.cpp (the sm80 kernels, the Hopper forward and backward), built once per session for
    both Hopper test files."""
    if not _BUILT:
        _BUILT.append(build_emulator(tmp_path_factory.mktemp("cuda_emulator_sm90"), "harness_sm90_bwd.cpp"))
    return _BUILT[0]


def hopper_kernels(tmp_path_factory: pytest.TempPathFactory, harness: str) -> EmulatedKernels:
    return EmulatedKernels(HopperLibrary(hopper_library(tmp_path_factory), HARNESSES[harness]))


@pytest.fixture(scope="session", params=list(HARNESSES))
def hopper(request, tmp_path_factory) -> EmulatedKernels:
    return hopper_kernels(tmp_path_factory, request.param)


@pytest.fixture(autouse=True)
def fresh_inputs():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))


@pytest.mark.parametrize("seqlen", [1, 17, 129])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_and_padding(hopper, seqlen, mask_kind, causal):
    """Causal cases take the deterministic backward, the others the atomic one: each path sees every length
    and mask kind."""
    case = padded_case(2, seqlen, seqlen, 2, 1, 64, torch.float16, mask_kind, causal=causal)
    hopper.run(case, deterministic=causal)


@pytest.mark.parametrize("mask_kind", ["none", "holes"])
@pytest.mark.parametrize("causal", [False, True])
def test_several_tiles_per_block(hopper, mask_kind, causal):
    """300 tokens: three query tiles, three key tiles (a partial last one), the rings wrapping their stages; the
    Hopper dK/dV kernel walks five 64-row query tiles per key tile."""
    hopper.run(padded_case(1, 300, 300, 1, 1, 64, torch.bfloat16, mask_kind, causal=causal))


@pytest.mark.parametrize("heads_q,heads_kv", [(2, 2), (4, 2), (4, 1)])
def test_gqa_ratios(hopper, heads_q, heads_kv):
    """A dK/dV block walks every query head of its kv head's group: dK and dV reduced over it in registers."""
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
    """The gradient of lse enters the backward through delta (read per query): this forward's lse must be exact."""
    hopper.run(padded_case(2, 77, 77, 2, 1, 64, torch.float16, "empty_row"), with_dlse=True)
    hopper.run(varlen_case([30, 0, 50], [30, 0, 50], 2, 2, 128, torch.bfloat16), deterministic=True, with_dlse=True)


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


def test_tiles_fully_padded(hopper):
    """Left padding over more than one 128-row tile and a hole spanning a whole key tile: those tiles are
    never loaded, their rows (out, dq) and keys (dk, dv) still come out zero, the real rows miss nothing."""
    case = padded_case(2, 300, 300, 1, 1, 128, torch.float16)
    case.key_mask = torch.ones(2, 300, dtype=torch.bool)
    case.key_mask[0, :200] = False
    case.key_mask[1, 64:256] = False
    hopper.run(case)


# ---- non-finite inputs (test_nonfinite.py's cases): TMA loads padded and out-of-sequence rows of Q, dO, K
# and V as they are (the sm80 cp.async ring zero-fills them), so 0 * NaN reaches the accumulators and the exact
# slow paths (rows, the atomic path's dQ elements) must repair every output that does not see the poison.


def check_nonfinite_semantics(kernels: EmulatedKernels, poisoned, deterministic: bool) -> None:
    """NaN exactly where the reference has it (nowhere if the poison is masked), the clean values elsewhere."""
    poisoned.build()
    clean = poisoned.clean.oracle(with_dlse=False)
    got = cuda_emulated(kernels, deterministic=deterministic)(poisoned.case)
    if poisoned.masked_only:
        expected_nan = [torch.zeros_like(t, dtype=torch.bool) for t in clean]
    else:
        expected_nan = [torch.isnan(t) for t in public_api("reference")(poisoned.case)]
    for name, value, reference, nan_where in zip(NAMES, got, clean, expected_nan):
        assert_nan_or_clean(name, value, reference.float(), nan_where)


def check_nonfinite_values(kernels: EmulatedKernels, poisoned, deterministic: bool) -> None:
    poisoned.build()
    expected = public_api("reference")(poisoned.case)
    got = cuda_emulated(kernels, deterministic=deterministic)(poisoned.case)
    for name, value, reference in zip(NAMES, got, expected):
        assert_nan_or_clean(name, value, reference, torch.isnan(reference))


@pytest.mark.parametrize("poisoned", [pytest.param(case, id=case.name) for case in CASES])
def test_nonfinite_semantics(hopper, poisoned):
    check_nonfinite_semantics(hopper, poisoned, deterministic=False)


@pytest.mark.parametrize("poisoned", [pytest.param(case, id=case.name) for case in VALUE_CASES])
def test_nonfinite_values_match_the_reference(hopper, poisoned):
    check_nonfinite_values(hopper, poisoned, deterministic=False)
