"""The CUDA kernels of csrc/, run unchanged on the CPU emulator of tests/cuda_emulator/.

No GPU needed: the kernel source is compiled as host C++ against emulated PTX instructions
(ldmatrix, mma.sync, cp.async, shuffles), one fiber per CUDA thread, with shared-memory race,
cp.async, bounds and deadlock checks (emulator.h). The forward and both backward paths (atomic
dQ and deterministic) are compared with the float64 oracle on fresh random inputs, outputs poisoned
(NaN) beforehand. The glue below mirrors csrc/flash_api.cpp: same parameter builder, same kernel
sequence, same scratch buffers. What it cannot show: hardware-only behaviour (timing, real
memory ordering, the tensor cores' rounding); see benchmarks/NOTES.md.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from attention_cases import MASK_KINDS, Case, check, padded_case, varlen_case

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent / "csrc"
EMULATOR = HERE / "cuda_emulator"
ELEM = {torch.float16: 0, torch.bfloat16: 1}


class TensorView(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dim", ctypes.c_int),
        ("size", ctypes.c_int64 * 4),
        ("stride", ctypes.c_int64 * 4),
    ]


class AttnArgs(ctypes.Structure):
    _fields_ = [
        ("q", TensorView),
        ("k", TensorView),
        ("v", TensorView),
        ("key_bits", ctypes.c_void_p),
        ("cu_seqlens_q", ctypes.c_void_p),
        ("cu_seqlens_k", ctypes.c_void_p),
        ("num_seqs", ctypes.c_int),
        ("max_seqlen_q", ctypes.c_int),
        ("max_seqlen_k", ctypes.c_int),
        ("causal", ctypes.c_bool),
        ("window_left", ctypes.c_int),
        ("window_right", ctypes.c_int),
        ("softcap", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


def view(tensor: torch.Tensor | None) -> TensorView:
    result = TensorView()
    if tensor is not None:
        result.data, result.dim = tensor.data_ptr(), tensor.dim()
        for d in range(tensor.dim()):
            result.size[d], result.stride[d] = tensor.shape[d], tensor.stride(d)
    return result


def pointer(tensor: torch.Tensor | None) -> ctypes.c_void_p | None:
    return None if tensor is None else ctypes.c_void_p(tensor.data_ptr())


class EmulatedKernels:
    """Runs the kernels as csrc/flash_api.cpp would, every tensor registered with the emulator."""

    def __init__(self, library: ctypes.CDLL):
        self.lib = library
        self.lib.emu_last_error.restype = ctypes.c_char_p
        self.lib.emu_sizeof_attn_args.restype = ctypes.c_int64
        self.lib.emu_sizeof_tensor_view.restype = ctypes.c_int64
        assert self.lib.emu_sizeof_attn_args() == ctypes.sizeof(AttnArgs), (
            "AttnArgs layout drifted from params_builder.h"
        )
        assert self.lib.emu_sizeof_tensor_view() == ctypes.sizeof(TensorView), "TensorView layout drifted"

    def _register(self, writable: bool, **tensors: torch.Tensor | None) -> None:
        for name, tensor in tensors.items():
            if tensor is None or tensor.numel() == 0:
                continue
            extent = (sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride())) + 1) * tensor.element_size()
            self.lib.emu_register_buffer(pointer(tensor), ctypes.c_int64(extent), name.encode(), int(writable))

    def _args(self, case: Case, key_bits: torch.Tensor | None) -> AttnArgs:
        args = AttnArgs(q=view(case.q), k=view(case.k), v=view(case.v))
        args.key_bits = None if key_bits is None else key_bits.data_ptr()
        if case.cu_seqlens_q is not None:
            args.cu_seqlens_q, args.cu_seqlens_k = case.cu_seqlens_q.data_ptr(), case.cu_seqlens_k.data_ptr()
            args.num_seqs = case.cu_seqlens_q.numel() - 1
            args.max_seqlen_q, args.max_seqlen_k = case.max_seqlens
        args.causal = case.causal
        args.window_left, args.window_right = case.window_size
        args.softcap, args.scale = case.softcap, case.scale
        return args

    def _key_bits(self, case: Case) -> torch.Tensor | None:
        if case.key_mask is None:
            return None
        words = self.lib.emu_key_bits_words(ctypes.c_int64(case.k.shape[1]))
        return torch.full((case.k.shape[0], words), -7, dtype=torch.int32)  # poisoned: the packer fills it

    def _run(self, status: int) -> None:
        if status != 0:
            raise AssertionError(f"emulator: {self.lib.emu_last_error().decode()}")

    def forward(self, case: Case) -> tuple[torch.Tensor, torch.Tensor]:
        varlen = case.cu_seqlens_q is not None
        out = torch.full(case.q.shape, float("nan"), dtype=case.q.dtype)
        lse = torch.full(case.dlse.shape, float("nan"))
        key_bits = self._key_bits(case)
        self.lib.emu_clear_buffers()
        self._register(
            False, q=case.q, k=case.k, v=case.v, mask=case.key_mask, cu_q=case.cu_seqlens_q, cu_k=case.cu_seqlens_k
        )
        self._register(True, out=out, lse=lse, key_bits=key_bits)
        mask_view = view(case.key_mask) if case.key_mask is not None and not varlen else None
        self._run(
            self.lib.emu_forward(
                ELEM[case.q.dtype],
                ctypes.byref(self._args(case, key_bits)),
                ctypes.byref(mask_view) if mask_view is not None else None,
                pointer(key_bits),
                ctypes.byref(view(out)),
                pointer(lse),
            )
        )
        return out, lse

    def backward(self, case: Case, out: torch.Tensor, lse: torch.Tensor, deterministic: bool, with_dlse: bool):
        poisoned = lambda like: torch.full(like.shape, float("nan"), dtype=like.dtype)  # noqa: E731
        dq, dk, dv = poisoned(case.q), poisoned(case.k), poisoned(case.v)
        lse_log2, delta = poisoned(lse), poisoned(lse)
        dq_accum = None if deterministic else torch.zeros(case.q.shape, dtype=torch.float32)
        dlse = case.dlse if with_dlse else None
        key_bits = self._key_bits(case)
        self.lib.emu_clear_buffers()
        self._register(
            False,
            q=case.q,
            k=case.k,
            v=case.v,
            mask=case.key_mask,
            cu_q=case.cu_seqlens_q,
            cu_k=case.cu_seqlens_k,
            out=out,
            dout=case.dout,
            lse=lse,
            dlse=dlse,
        )
        self._register(True, lse_log2=lse_log2, delta=delta, dq=dq, dk=dk, dv=dv, dq_accum=dq_accum, key_bits=key_bits)
        mask_view = view(case.key_mask) if case.key_mask is not None else None
        self._run(
            self.lib.emu_backward(
                ELEM[case.q.dtype],
                ctypes.byref(self._args(case, key_bits)),
                ctypes.byref(mask_view) if mask_view is not None else None,
                pointer(key_bits),
                ctypes.byref(view(case.dout)),
                ctypes.byref(view(out)),
                pointer(lse),
                pointer(dlse),
                pointer(lse_log2),
                pointer(delta),
                ctypes.byref(view(dq)),
                ctypes.byref(view(dk)),
                ctypes.byref(view(dv)),
                ctypes.byref(view(dq_accum)),
            )
        )
        if dq_accum is not None:  # as the binding: scale and cast the atomically accumulated dQ
            dq = (dq_accum * case.scale).to(case.q.dtype)
        return dq, dk, dv

    def run(self, case: Case, deterministic: bool = False, with_dlse: bool = False) -> None:
        out, lse = self.forward(case)
        check(case, (out, lse, *self.backward(case, out, lse, deterministic, with_dlse)), with_dlse)


def build_emulator(directory: Path, *sources: str, flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The emulator library of `sources` (files of tests/cuda_emulator/), built with g++ -O2 into `directory`
    and loaded. Without g++ the tests skip, except in CI, where they fail."""
    compiler = shutil.which("g++")
    if compiler is None:
        if os.environ.get("CI"):
            pytest.fail("g++ is not on PATH: CI must run the emulated CUDA kernel tests")
        pytest.skip("g++ is not on PATH (CI fails instead of skipping)")
    library = directory / "libemulator.so"
    command = [compiler, "-std=c++17", "-O2", "-fPIC", "-shared", *flags, f"-I{CSRC}", f"-I{EMULATOR}"]
    command += [str(EMULATOR / source) for source in sources] + ["-o", str(library)]
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, f"building the emulator from {', '.join(sources)} failed:\n{build.stderr[-4000:]}"
    return ctypes.CDLL(str(library))


@pytest.fixture(scope="session")
def emulator(tmp_path_factory) -> EmulatedKernels:
    return EmulatedKernels(build_emulator(tmp_path_factory.mktemp("cuda_emulator"), "harness.cpp", "selftest.cpp"))


@pytest.fixture(autouse=True)
def fresh_inputs():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))


# ---- the kernels --------------------------------------------------------------------------------


@pytest.mark.parametrize("seqlen", [1, 17, 64, 129])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_and_padding(emulator, seqlen, mask_kind, causal):
    case = padded_case(2, seqlen, seqlen, 2, 1, 64, torch.float16, mask_kind, causal=causal)
    emulator.run(case, deterministic=causal)


@pytest.mark.parametrize("mask_kind", ["none", "holes"])
@pytest.mark.parametrize("causal", [False, True])
def test_several_tiles_per_block(emulator, mask_kind, causal):
    """300 tokens: three query tiles, five key tiles, a partial last one; both backward paths."""
    case = padded_case(1, 300, 300, 2, 1, 64, torch.bfloat16, mask_kind, causal=causal)
    emulator.run(case, deterministic=causal)


@pytest.mark.parametrize("heads_q,heads_kv", [(2, 2), (4, 2), (4, 1), (8, 1)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gqa_ratios(emulator, heads_q, heads_kv, deterministic):
    emulator.run(padded_case(1, 70, 70, heads_q, heads_kv, 128, torch.bfloat16, "holes"), deterministic)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("deterministic", [False, True])
def test_dtypes_and_head_dims(emulator, dtype, head_dim, deterministic):
    emulator.run(padded_case(2, 100, 100, 2, 1, head_dim, dtype, "right", causal=True), deterministic)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_varlen_uneven_lengths(emulator, causal, head_dim):
    lengths = [1, 0, 17, 130, 64]
    emulator.run(varlen_case(lengths, lengths, 4, 2, head_dim, torch.bfloat16, causal=causal), deterministic=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_cross_lengths(emulator, causal):
    """Query and key lengths differ per sequence (bottom-right causal alignment), one key set empty."""
    case = varlen_case([5, 70, 33, 8], [40, 3, 33, 0], 2, 1, 64, torch.float16, causal=causal)
    emulator.run(case, deterministic=not causal)


@pytest.mark.parametrize("seqlen_q,seqlen_k", [(40, 100), (100, 40)])
@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_with_key_mask(emulator, seqlen_q, seqlen_k, causal):
    """seqlen_q != seqlen_k: the mask marks keys only, query rows are all real."""
    emulator.run(padded_case(2, seqlen_q, seqlen_k, 2, 2, 64, torch.bfloat16, "holes", causal=causal))


@pytest.mark.parametrize(
    "window_size,softcap", [((16, 0), 0.0), ((8, 8), 0.0), ((-1, 4), 0.0), ((-1, -1), 5.0), ((20, 3), 2.0)]
)
@pytest.mark.parametrize("deterministic", [False, True])
def test_window_and_softcap(emulator, window_size, softcap, deterministic):
    case = padded_case(2, 90, 90, 2, 1, 64, torch.float16, "holes", window_size=window_size, softcap=softcap)
    emulator.run(case, deterministic)


def test_lse_gradient(emulator):
    """The gradient of lse enters the backward through delta."""
    emulator.run(padded_case(2, 77, 77, 2, 1, 64, torch.float16, "empty_row"), with_dlse=True)
    emulator.run(varlen_case([30, 0, 50], [30, 0, 50], 2, 2, 128, torch.bfloat16), deterministic=True, with_dlse=True)


def test_strided_inputs_and_custom_scale(emulator):
    """Inputs as (B, H, S, D) transposes and head slices of a wider tensor, no copies."""
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
    emulator.run(case)


def test_query_tile_fully_padded(emulator):
    """A sequence padded on its whole first query tiles: those tiles are skipped, still zero."""
    case = padded_case(2, 300, 300, 2, 1, 128, torch.float16)
    case.key_mask = torch.ones(2, 300, dtype=torch.bool)
    case.key_mask[0, :200] = False  # left padding over more than one 128-row tile
    case.key_mask[1, 64:256] = False  # a hole spanning whole key tiles
    emulator.run(case)
    emulator.run(case, deterministic=True)


@pytest.mark.parametrize(
    "window_size,softcap,scale", [((20, 3), 2.0, None), ((-1, 0), 0.0, None), ((-1, -1), 0.0, -0.2)]
)
def test_head_dim_128_windows_softcap_and_holes(emulator, window_size, softcap, scale):
    """Head dim 128 runs 32-key tiles of 32 query rows per warp (configs.cuh): window edges, the soft cap and a
    key mask with holes over several key tiles, through both backward paths; a negative scale takes the
    forward's path that scales scores before the max (a positive one folds into the exponent)."""
    options = dict(window_size=window_size, softcap=softcap, softmax_scale=scale)
    case = padded_case(1, 150, 150, 2, 1, 128, torch.bfloat16, "holes", **options)
    emulator.run(case, deterministic=softcap > 0)


def test_head_dim_128_nan_beyond_some_windows(emulator):
    """A NaN value row that a window hides from most rows, at head dim 128: exactly the rows (and gradients)
    that see it are NaN; the rest, whose window-edge tiles multiplied zero weights by it, come out clean."""
    from test_nonfinite import NAMES, assert_nan_or_clean, cuda_emulated, public_api  # noqa: PLC0415 (a cycle)

    q, k, v = (torch.randn(1, 100, heads, 128).to(torch.float16) for heads in (2, 1, 1))
    clean = Case(q, k, v, None, window_size=(3, 3))
    poisoned_v = v.clone()
    poisoned_v[:, 70] = float("nan")
    case = Case(q, k, poisoned_v, None, window_size=(3, 3))
    case.dout, case.dlse = clean.dout, clean.dlse
    expected_nan = [torch.isnan(t) for t in public_api("reference")(case)]
    assert expected_nan[0].any() and not expected_nan[0].all(), "the poison reaches some rows only"
    got = cuda_emulated(emulator, deterministic=True)(case)
    for name, value, reference, nan_where in zip(NAMES, got, clean.oracle(with_dlse=False), expected_nan):
        assert_nan_or_clean(name, value, reference.float(), nan_where)


# ---- the emulator itself ------------------------------------------------------------------------

BUG_REPORTS = {
    0: "",
    1: "never-written",  # another thread's copy, read before the barrier (before it even landed)
    2: "cp.async in flight",
    3: "cp.async in flight",
    4: "unsynchronised read",
    5: "unsynchronised write",
    6: "deadlock",
    7: "outside every registered buffer",
    8: "second store",
    9: "past the",
    10: "exited with cp.async",
    11: "divergent warp",
    12: "",
}


@pytest.mark.parametrize("bug", sorted(BUG_REPORTS))
def test_emulator_reports_planted_bugs(emulator, bug):
    lib = emulator.lib
    lib.emu_selftest_bug.restype = ctypes.c_char_p
    source = torch.randint(0, 1000, (64 * 64,), dtype=torch.int16)
    out = torch.full((128,), float("nan"))
    lib.emu_clear_buffers()
    emulator._register(False, source=source)
    emulator._register(True, out=out)
    report = lib.emu_selftest_bug(bug, pointer(source), pointer(out)).decode()
    if BUG_REPORTS[bug]:
        assert BUG_REPORTS[bug] in report, (
            f"bug {bug}: expected a report containing {BUG_REPORTS[bug]!r}, got {report!r}"
        )
    else:
        assert report == "", report
        assert not out.isnan().any(), "the correct kernel writes every output"


@pytest.mark.parametrize("form", range(4))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fragment_helpers_match_matmul(emulator, form, dtype):
    """tile.cuh's four operand forms (A plain/.trans, B plain/.trans) on swizzled tiles, through mma."""
    lib = emulator.lib
    lib.emu_selftest_fragments.restype = ctypes.c_char_p
    a, b = torch.randn(64, 64).to(dtype), torch.randn(64, 64).to(dtype)
    d = torch.full((16, 16), float("nan"))
    lib.emu_clear_buffers()
    emulator._register(False, a=a, b=b)
    emulator._register(True, d=d)
    report = lib.emu_selftest_fragments(form, ELEM[dtype], pointer(a), pointer(b), pointer(d)).decode()
    assert report == "", report
    # Operands start at row 16, column 16 of their tiles; A is 16 x 32, B 32 x 16.
    a_op = a[16:48, 16:32].T if form & 1 else a[16:32, 16:48]
    b_op = b[16:48, 16:32] if form & 2 else b[16:32, 16:48].T
    expected = a_op.double() @ b_op.double()
    assert (d.double() - expected).abs().max().item() < 1e-4
