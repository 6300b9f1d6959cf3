"""The Hopper backward of csrc/ (flash_attn/hopper/bwd_sm90.cuh, bwd_dq_sm90.cuh, sm_90a) on the CPU emulator:
what the case matrix of test_cuda_emulated_sm90.py (which runs both backward paths) does not show.

deterministic=True runs the Hopper dK/dV kernel without its dQ product, then the Hopper dQ kernel, both
persistent (a grid of at most ctas blocks, each walking work tiles c, c + ctas, ...; the harness's default
ctas is 3, emu_set_backward_ctas changes it): every dq element is written once by a plain store (the emulator
fails a launch that stores to one word twice), and blocks that walk several work tiles (ring and K/V or Q/dO
barriers carried across them, empty tiles skipped in between) give the same bits as one block per tile. The
atomic path's dK/dV kernel (the default) is persistent too: with 1 or 3 blocks walking the work tiles it matches
the oracle, and its dk and dv are the deterministic path's bits. The emulator runs a grid's blocks one after another,
in launch order or in a permutation a seed fixes (emu_set_block_order): the deterministic path gives
bitwise-equal dq, dk and dv under different orders, while the atomic path, whose float32 dQ sums depend on the
order the key tiles' blocks add in, does not, which shows that the check can fail. The deterministic path is
also compared with the float64 oracle at the matrix's key points and on test_nonfinite.py's cases.
What it cannot show: timing, the tensor cores' rounding, the hardware's scheduling of blocks.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Callable

import pytest
import torch
from attention_cases import Case, check, padded_case, varlen_case
from test_cuda_emulated import EmulatedKernels
from test_cuda_emulated_sm90 import check_nonfinite_semantics, check_nonfinite_values, hopper_kernels
from test_nonfinite import CASES, VALUE_CASES

# Block orders: launch order, and two seeds whose permutations of reproducibility_case's three dK/dV blocks differ
# from it and from each other (2 0 1 and 2 1 0 with libstdc++'s std::shuffle; the atomic test below checks that
# the orders differ in effect).
ORDER_SEEDS = (0, 1, 3)


class AccumulatorCopy:
    """An emulator library whose emu_backward also keeps a copy of the float32 dQ accumulator it filled (the atomic
    path's sums, before the binding's scale and cast); the other entry points pass through."""

    def __init__(self, library):
        self._library = library
        self.dq_accum: torch.Tensor | None = None

    def __getattr__(self, name: str):
        return getattr(self._library, name)

    def emu_backward(self, *args):
        status = self._library.emu_backward(*args)
        accum = args[-1]._obj  # the TensorView behind the last byref argument (data null: deterministic)
        self.dq_accum = None
        if accum.data:
            raw = (ctypes.c_float * math.prod(accum.size[: accum.dim])).from_address(accum.data)
            self.dq_accum = torch.frombuffer(raw, dtype=torch.float32).clone()
        return status


@pytest.fixture(scope="session")
def hopper(tmp_path_factory) -> EmulatedKernels:
    kernels = hopper_kernels(tmp_path_factory, "hopper_backward")
    kernels.lib = AccumulatorCopy(kernels.lib)
    return kernels


@pytest.fixture
def block_order(hopper) -> Callable[[int], None]:
    """Sets the order every later launch runs its blocks in (0: launch order); launch order again afterwards."""
    yield lambda seed: hopper.lib.emu_set_block_order(ctypes.c_uint64(seed))
    hopper.lib.emu_set_block_order(ctypes.c_uint64(0))


# The harness's persistent grid size (kEmulatedSms of harness_sm90.cpp), restored after each test that changes it.
DEFAULT_CTAS = 3


@pytest.fixture
def backward_ctas(hopper) -> Callable[[int], None]:
    """Sets at most how many blocks every later backward launch runs; the default again afterwards."""
    yield lambda ctas: hopper.lib.emu_set_backward_ctas(ctypes.c_int(ctas))
    hopper.lib.emu_set_backward_ctas(ctypes.c_int(DEFAULT_CTAS))


@pytest.fixture(autouse=True)
def fresh_inputs():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))


def tiles_fully_padded() -> Case:
    """Left padding over a whole 128-row query tile and a 128-key tile, a hole spanning a key tile."""
    case = padded_case(2, 300, 300, 1, 1, 128, torch.float16)
    case.key_mask = torch.ones(2, 300, dtype=torch.bool)
    case.key_mask[0, :200] = False
    case.key_mask[1, 64:256] = False
    return case


# The matrix's key points for the deterministic path (the matrix runs it on its causal lengths-and-padding
# cases and on one varlen dlse case).
KEY_POINTS = [
    pytest.param(lambda: padded_case(2, 1, 1, 2, 1, 64, torch.float16, "left"), False, id="len1-left"),
    pytest.param(lambda: padded_case(2, 17, 17, 4, 1, 64, torch.bfloat16, "holes"), False, id="len17-holes-gqa4"),
    pytest.param(
        lambda: padded_case(2, 129, 129, 2, 2, 128, torch.float16, "right", causal=True), False, id="len129-d128-gqa1"
    ),
    pytest.param(tiles_fully_padded, False, id="tiles-fully-padded-d128"),
    pytest.param(
        lambda: varlen_case([1, 0, 17, 130, 64], [1, 0, 17, 130, 64], 2, 1, 128, torch.bfloat16, causal=True),
        False,
        id="varlen-empty-d128",
    ),
    pytest.param(
        lambda: varlen_case([5, 70, 33, 8], [40, 3, 33, 0], 4, 1, 64, torch.float16, causal=True),
        False,
        id="varlen-cross-empty-keys-gqa4",
    ),
    pytest.param(
        lambda: padded_case(2, 90, 90, 2, 1, 64, torch.bfloat16, "holes", window_size=(8, 8)), False, id="window"
    ),
    pytest.param(
        lambda: padded_case(2, 90, 90, 2, 1, 64, torch.float16, "holes", window_size=(20, 3), softcap=2.0),
        False,
        id="window-softcap",
    ),
    pytest.param(lambda: padded_case(2, 90, 90, 4, 1, 128, torch.float16, "right", softcap=5.0), False, id="softcap"),
    pytest.param(lambda: padded_case(2, 77, 77, 2, 1, 64, torch.float16, "empty_row"), True, id="dlse"),
    pytest.param(
        lambda: padded_case(2, 40, 100, 2, 2, 64, torch.bfloat16, "holes", causal=True), False, id="cross-attention"
    ),
]


@pytest.mark.parametrize("make_case,with_dlse", KEY_POINTS)
def test_deterministic_matches_the_oracle(hopper, make_case, with_dlse):
    hopper.run(make_case(), deterministic=True, with_dlse=with_dlse)


# 300 tokens: three key tiles, so every dq element is a sum over three dK/dV blocks on the atomic path.
def reproducibility_case() -> Case:
    return padded_case(1, 300, 300, 2, 1, 64, torch.float16, "holes", causal=True)


def test_deterministic_is_bitwise_reproducible_under_block_orders(hopper, block_order):
    case = reproducibility_case()
    out, lse = hopper.forward(case)
    runs = []
    for seed in ORDER_SEEDS:
        block_order(seed)
        runs.append(hopper.backward(case, out, lse, deterministic=True, with_dlse=False))
    check(case, (out, lse, *runs[0]))
    for seed, grads in zip(ORDER_SEEDS[1:], runs[1:]):
        for name, first, again in zip(("dq", "dk", "dv"), runs[0], grads):
            assert torch.equal(first, again), f"{name} under block order {seed} differs from launch order"


def test_atomic_dq_depends_on_block_order(hopper, block_order):
    """The companion of the test above: the same check fails on the atomic path (its float32 dQ sums are added
    in the blocks' order), while its dk and dv (one block each) stay bitwise equal."""
    case = reproducibility_case()
    out, lse = hopper.forward(case)
    accumulators, runs = [], []
    for seed in ORDER_SEEDS:
        block_order(seed)
        runs.append(hopper.backward(case, out, lse, deterministic=False, with_dlse=False))
        accumulators.append(hopper.lib.dq_accum)
    check(case, (out, lse, *runs[0]))
    for seed, accum, grads in zip(ORDER_SEEDS[1:], accumulators[1:], runs[1:]):
        assert not torch.equal(accumulators[0], accum), f"atomic dQ sums under block order {seed} equal launch order's"
        assert torch.equal(runs[0][1], grads[1]) and torch.equal(runs[0][2], grads[2])


# ---- the persistent schedule: blocks that walk several work tiles


def packed_short_sequences() -> Case:
    """A packed batch of short sequences (one empty), one head: 10 dK/dV work tiles (2 key tiles x 5 sequences)
    and 10 dQ work tiles, most of the second round empty, between real ones; odd numbers of query tiles (4, 1, 3,
    1) and key tiles per work tile, so that the ring's stage and phase differ from one work tile to the next."""
    lengths = [200, 0, 17, 140, 5]
    return varlen_case(lengths, lengths, 1, 1, 64, torch.float16)


def padded_gqa_with_padded_key_tile() -> Case:
    """Three padded causal GQA-2 sequences of 300 tokens: 9 dK/dV work tiles, one a key tile of padding only
    (no query sees it: zeros between real tiles), one sequence's first 200 keys padding."""
    case = padded_case(3, 300, 300, 2, 1, 64, torch.bfloat16, causal=True)
    case.key_mask = torch.ones(3, 300, dtype=torch.bool)
    case.key_mask[1, 128:256] = False
    case.key_mask[2, :200] = False
    return case


@pytest.mark.parametrize("make_case", [packed_short_sequences, padded_gqa_with_padded_key_tile])
def test_persistent_blocks_walk_several_work_tiles(hopper, backward_ctas, block_order, make_case):
    """The deterministic path with 1 block (every work tile in one block), 3 blocks (in launch order and
    permuted) and a block per work tile: matches the oracle, and the same bits whatever the grid."""
    case = make_case()
    out, lse = hopper.forward(case)
    grids = ((1, 0), (3, 0), (3, 3), (64, 0))  # (ctas, block order seed)
    runs = []
    for ctas, seed in grids:
        backward_ctas(ctas)
        block_order(seed)
        runs.append(hopper.backward(case, out, lse, deterministic=True, with_dlse=False))
    check(case, (out, lse, *runs[0]))
    for (ctas, seed), grads in zip(grids[1:], runs[1:]):
        for name, first, again in zip(("dq", "dk", "dv"), runs[0], grads):
            assert torch.equal(first, again), f"{name} with {ctas} blocks (order {seed}) differs from one block's"


@pytest.mark.parametrize("make_case", [packed_short_sequences, padded_gqa_with_padded_key_tile])
def test_atomic_persistent_blocks_walk_several_work_tiles(hopper, backward_ctas, block_order, make_case):
    """The atomic path with 1 block (every work tile in one block) and 3 blocks (in launch order and permuted):
    matches the oracle each time, and its dk and dv (one block per key tile, in the same order of sums) are the
    bits of the deterministic path's dK/dV kernel, the same code without the dQ product."""
    case = make_case()
    out, lse = hopper.forward(case)
    deterministic = hopper.backward(case, out, lse, deterministic=True, with_dlse=False)
    for ctas, seed in ((1, 0), (3, 0), (3, 3)):  # (ctas, block order seed)
        backward_ctas(ctas)
        block_order(seed)
        grads = hopper.backward(case, out, lse, deterministic=False, with_dlse=False)
        check(case, (out, lse, *grads))
        for name, want, got in zip(("dk", "dv"), deterministic[1:], grads[1:]):
            assert torch.equal(want, got), f"atomic {name} with {ctas} blocks (order {seed}) differs from deterministic"


# ---- non-finite inputs on the deterministic path: the dQ kernel's exact slow path repairs every row that does
# not see the poison (TMA loads padded and out-of-sequence keys as they are).


@pytest.mark.parametrize("poisoned", [pytest.param(case, id=case.name) for case in CASES])
def test_deterministic_nonfinite_semantics(hopper, poisoned):
    check_nonfinite_semantics(hopper, poisoned, deterministic=True)


@pytest.mark.parametrize("poisoned", [pytest.param(case, id=case.name) for case in VALUE_CASES])
def test_deterministic_nonfinite_values_match_the_reference(hopper, poisoned):
    check_nonfinite_values(hopper, poisoned, deterministic=True)
