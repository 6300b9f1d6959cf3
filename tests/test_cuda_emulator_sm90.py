"""The Hopper layer's CPU emulator (tests/cuda_emulator/emulator_sm90.h) checked on itself.

A warp-specialised TMA + mbarrier + wgmma pipeline written against csrc/flash_attn/ptx_sm90.cuh
(tests/cuda_emulator/sm90_pipeline.cuh: O = sum over key tiles of cast(Q Kᵀ) V, SS and RS wgmma,
K-major and N-major operands, a two-stage ring, a TMA store) must match a float64 reference for
every swizzle span and both 16-bit types, and each classic Hopper pipeline bug planted in it must be
reported with a message that names it. A one-warpgroup SS GEMM covers the other operand
major-nesses and wider N. A bare TMA load's shared-memory image (swizzle, element
strides, out-of-bounds zero fill) must match the hardware's layout rule computed here independently.
What the emulator cannot show (timing, the tensor cores' rounding, clusters) is listed in
benchmarks/NOTES.md, section "Hopper PTX layer and emulator".
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from test_cuda_emulated import CSRC, ELEM, EMULATOR, build_emulator

TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 5e-3}
ROWS, DIM, KEY_TILE = 128, 64, 64


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> ctypes.CDLL:
    loaded = build_emulator(tmp_path_factory.mktemp("cuda_emulator_sm90"), "selftest_sm90.cpp", flags=("-Wno-psabi",))
    loaded.emu_sm90_pipeline.restype = ctypes.c_char_p
    loaded.emu_sm90_tma_image.restype = ctypes.c_char_p
    loaded.emu_sm90_gemm.restype = ctypes.c_char_p
    return loaded


@pytest.fixture(autouse=True)
def fresh_inputs():
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))


def pointer(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


def run_pipeline(entry, dtype, span: int, bug: int = 0, keys: int = 150, heads: int = 2):
    """(report, inputs, o, probe) of emu_sm90_pipeline or gpu_sm90_pipeline: o and probe
    NaN-poisoned before the run."""
    head = int(torch.randint(0, heads, ()))
    q = (torch.randn(ROWS, DIM) * 0.5).to(dtype)
    k = (torch.randn(keys, heads, DIM) * 0.5).to(dtype)
    v = torch.randn(keys, heads, DIM).to(dtype)
    o = torch.full((ROWS, DIM), float("nan"))
    probe = torch.full((256,), float("nan"))
    report = entry(
        ELEM[dtype], bug, span, keys, heads, head, pointer(q), pointer(k), pointer(v), pointer(o), pointer(probe)
    ).decode()
    return report, (q, k[:, head], v[:, head]), o, probe


def reference(q, k, v, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """O = sum over 64-key tiles of cast(Q Kᵀ) V in float64 (S rounded as the kernel rounds it), and S."""
    scores = q.double() @ k.double().T
    p = scores.float().to(dtype).double()
    return p @ v.double(), scores


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def check_pipeline(entry, span, dtype):
    """150 keys: three tiles, the last 22 keys real and the rest zero-filled by TMA out of bounds."""
    report, (q, k, v), o, probe = run_pipeline(entry, dtype, span)
    assert report == "", report
    assert not o.isnan().any(), "the TMA store writes every output element"
    expected, scores = reference(q, k, v, dtype)
    assert relative_error(o, expected) < TOLERANCE[dtype]
    # probe[128c + t] is accumulator register 0 of consumer c's thread t for the first tile:
    # row 64c + 16 (t / 32) + (t % 32) / 4, column 2 (t % 4) of the wgmma D layout.
    t = torch.arange(256)
    rows = 64 * (t // 128) + 16 * ((t % 128) // 32) + (t % 32) // 4
    assert relative_error(probe, scores[rows, 2 * (t % 4)]) < 1e-6


@pytest.mark.parametrize("span", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pipeline_matches_float64(lib, span, dtype):
    check_pipeline(lib.emu_sm90_pipeline, span, dtype)


@pytest.mark.parametrize("span", [32, 64, 128])
@pytest.mark.parametrize("a_major,b_major", [("k", "k"), ("k", "mn"), ("mn", "k"), ("mn", "mn")])
@pytest.mark.parametrize("n", [64, 192])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ss_wgmma_majors_and_widths(lib, span, a_major, b_major, n, dtype):
    """D = A Bᵀ through SS wgmma with each operand K- or MN-major in shared memory (MN-major B of
    192 columns spans several swizzle atoms, so the leading byte offset is exercised)."""
    a, b = torch.randn(64, 64).to(dtype), torch.randn(n, 64).to(dtype)
    a_mem = a.T.contiguous() if a_major == "mn" else a
    b_mem = b.T.contiguous() if b_major == "mn" else b
    d = torch.full((64, n), float("nan"))
    report = lib.emu_sm90_gemm(
        ELEM[dtype], n, a_major == "mn", b_major == "mn", span, pointer(a_mem), pointer(b_mem), pointer(d)
    ).decode()
    assert report == "", report
    assert relative_error(d, a.double() @ b.double().T) < 1e-6


def build_gpu_runner(directory: Path) -> Path:
    """tests/cuda_emulator/sm90_pipeline_gpu.cu as a shared library (nvcc, sm_90a)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc is not on PATH: CI must build the Hopper pipeline's GPU runner")
        pytest.skip("nvcc is not on PATH (CI fails instead of skipping)")
    library = directory / "libsm90_gpu.so"
    command = [nvcc, "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_90a,code=sm_90a"]
    command += [f"-I{CSRC}", f"-I{EMULATOR}", str(EMULATOR / "sm90_pipeline_gpu.cu"), "-o", str(library)]
    build = subprocess.run(command, capture_output=True, text=True)
    assert build.returncode == 0, f"building the GPU runner failed:\n{build.stderr[-4000:]}"
    return library


def test_gpu_runner_builds(tmp_path):
    """The runner that checks the same pipeline on a GPU compiles here (driver encoder included)."""
    assert build_gpu_runner(tmp_path).stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.parametrize("span", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pipeline_on_gpu_matches_float64(tmp_path, span, dtype):
    """On an sm_90 GPU: the layouts, swizzles and fragments the emulator assumes are the hardware's."""
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs an sm_90 GPU")
    gpu = ctypes.CDLL(str(build_gpu_runner(tmp_path)))
    gpu.gpu_sm90_pipeline.restype = ctypes.c_char_p
    check_pipeline(gpu.gpu_sm90_pipeline, span, dtype)


# Planted bug (sm90_pipeline.cuh's Bug enum) -> words its report must contain.
BUG_REPORTS = {
    1: ("wgmma operand", "(wrong swizzle)"),
    2: ("TMA store", "fence.proxy.async missing"),
    3: ("deadlock", "wait for parity 1"),  # waiting for the wrong parity hangs
    4: ("wgmma operand B", "before waiting for the mbarrier phase it completes on"),
    5: ("TMA load", "producer reused a stage its consumers had not released"),
    6: ("st.global.f32", "in-flight accumulator read"),
    7: ("wgmma.fence missing",),
    8: ("deadlock", "does expect_tx match the bytes its TMA loads deliver?"),
    9: ("accumulator registers were written while their wgmma was in flight",),
    10: ("deadlock", "waiting for registers other warpgroups hold"),
    11: ("st.shared.u32", "writes shared memory an in-flight wgmma reads (before its wgmma_wait)"),
    12: ("wgmma operand A", "fence.proxy.async missing"),
    13: ("bar.sync", "threads disagree on named barrier 1's thread count"),
    14: ("written after the last wgmma_fence", "wgmma.fence missing"),
}


@pytest.mark.parametrize("bug", sorted(BUG_REPORTS))
def test_planted_bug_is_caught(lib, bug):
    report, *_ = run_pipeline(lib.emu_sm90_pipeline, torch.bfloat16, 128, bug=bug)
    for words in BUG_REPORTS[bug]:
        assert words in report, f"bug {bug}: expected {words!r} in the report, got {report!r}"


def tma_image_reference(src: torch.Tensor, span: int, box: tuple[int, int], stride1: int, c0: int, c1: int):
    """The bytes a TMA load of box (cols, rows) at (c0, c1) leaves in shared memory: elements in
    box order (column fastest), every stride1-th row, zero outside the tensor, then 16-byte chunk
    j of each 128-byte line L moved to j ^ (L % (span / 16))."""
    rows_in_box = -(-box[1] // stride1)
    image = torch.zeros(rows_in_box * box[0] * 2, dtype=torch.uint8)
    raw = src.view(torch.uint8).reshape(src.shape[0], src.shape[1], 2)
    for r in range(rows_in_box):
        for c in range(box[0]):
            row, col = c1 + r * stride1, c0 + c
            offset = 2 * (r * box[0] + c)
            if span:
                offset ^= ((offset >> 7) & (span // 16 - 1)) << 4
            if 0 <= row < src.shape[0] and 0 <= col < src.shape[1]:
                image[offset : offset + 2] = raw[row, col]
    return image


@pytest.mark.parametrize(
    "span,box,stride1,c0,c1",
    [
        (0, (16, 8), 1, 8, 3),
        (32, (16, 16), 2, 0, -5),  # rows above the tensor, every other row
        (64, (32, 8), 1, 40, 60),  # columns and rows past the end
        (128, (64, 16), 3, -16, 2),  # columns before the start, every third row
    ],
)
def test_tma_load_image(lib, span, box, stride1, c0, c1):
    rows, cols = 64, 72
    src = torch.randint(-30000, 30000, (rows, cols), dtype=torch.int16)
    expected = tma_image_reference(src, span, box, stride1, c0, c1)
    image = torch.full_like(expected, 0xAB)
    report = lib.emu_sm90_tma_image(span, *box, stride1, c0, c1, rows, cols, pointer(src), pointer(image)).decode()
    assert report == "", report
    assert torch.equal(image, expected)


def test_tensor_map_checks_name_the_problem(lib):
    src = torch.zeros(64, 72, dtype=torch.int16)
    image = torch.zeros(4096, dtype=torch.uint8)
    report = lib.emu_sm90_tma_image(64, 64, 8, 1, 0, 0, 64, 72, pointer(src), pointer(image)).decode()
    assert report == "TMA box inner extent (128 bytes) exceeds the 64-byte swizzle span"
    report = lib.emu_sm90_tma_image(0, 64, 8, 9, 0, 0, 64, 72, pointer(src), pointer(image)).decode()
    assert report == "TMA element stride of dimension 1 must be 1..8"
