"""benchmarks/kernel_report.py: its SASS reading (steady loop, path, features), its --check rules, its command
line, and the CUDA part on real nvcc output (the Triton catalog's compile runs once, in test_triton_compile.py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from kernel_report import HOPPER, SWEPT_CLASS, cuda_archs, cuda_rows, problems, table_row, triton_jobs  # noqa: E402
from sass_analysis import parse_ptxas_log, parse_resource_usage, parse_sass, sass_features, steady_loop  # noqa: E402
from triton_static import catalog, mma_partitions, warp_specialized  # noqa: E402


def sass(*instructions: str) -> str:
    """cuobjdump -sass text of one function, an instruction every 16 bytes from 0."""
    lines = ["\t\tFunction : kernel"]
    lines += [f"        /*{16 * i:04x}*/   {text} ;   /* 0x0 */" for i, text in enumerate(instructions)]
    return "\n".join(lines)


# 0x00 setup; loop A 0x10-0x60: a spin-wait (0x20-0x30, no MMA) inside, two HGMMA, a branch over an FMUL;
# loop B 0x80-0xf0: the same two HGMMA and more instructions; then the exit.
TWO_LOOPS = sass(
    "S2R R0, SR_TID.X",
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ",  # 0x10: loop A starts
    "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8], R3",  # 0x20: spin-wait
    "@!P0 BRA 0x20",  # 0x30: spin-wait's back branch
    "@P1 BRA 0x60",  # 0x40: skips the FMUL (not an MMA)
    "FMUL R4, R4, R5",  # 0x50
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24",  # 0x60
    "@P2 BRA 0x10",  # 0x70: loop A's back branch
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ",  # 0x80: loop B
    "LOP3.LUT R6, R6, 0xff, RZ, 0xc0, !PT",
    "ISETP.GE.AND P3, PT, R6, R7, PT",
    "FSEL R8, R8, -INF, P3",
    "FMNMX R10, R10, R8, !PT",
    "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24",
    "IADD3 R9, R9, 0x1, RZ",
    "@P4 BRA 0x80",  # 0xf0
    "EXIT",
    "BRA 0x110",  # 0x110: the trap after the exit, a branch to itself
)


def test_steady_loop_is_the_shortest_innermost_loop_with_the_most_mma():
    (instructions,) = parse_sass(TWO_LOOPS).values()
    loop = steady_loop(instructions)
    assert (loop.start, loop.end, loop.mma) == (0x10, 0x70, 2)  # the spin-wait inside does not disqualify it
    assert len(loop.body) == 7
    assert loop.path == 6  # the branch skips the FMUL


def test_a_branch_back_from_code_after_the_exit_is_no_loop():
    """ptxas places an mbarrier wait's retry path after the kernel's EXIT and branches back into the loop."""
    instructions = parse_sass(
        sass(
            "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ",  # 0x00: the loop
            "@!P0 BRA 0x50",  # 0x10: to the retry path
            "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24",  # 0x20
            "@P1 BRA 0x0",  # 0x30: the loop's back branch
            "EXIT",  # 0x40
            "SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8], R3",  # 0x50: the retry path
            "BRA 0x20",  # 0x60: back into the loop
        )
    )["kernel"]
    loop = steady_loop(instructions)
    assert (loop.start, loop.end, loop.mma) == (0x0, 0x30, 2)


def test_the_path_never_skips_an_mma_instruction():
    instructions = parse_sass(
        sass("HMMA.16816.F32 R4, R8, R12, R4", "@P0 BRA 0x30", "HMMA.16816.F32 R4, R8, R14, R4", "@P1 BRA 0x0")
    )["kernel"]
    loop = steady_loop(instructions)
    assert (loop.mma, loop.path, len(loop.body)) == (2, 4, 4)


def test_no_mma_loop_means_no_steady_loop():
    instructions = parse_sass(sass("FADD R1, R1, R2", "@P0 BRA 0x0", "EXIT"))["kernel"]
    assert steady_loop(instructions) is None


def test_features_name_wgmma_tma_setmaxnreg_and_mma_sync():
    instructions = parse_sass(
        sass("USETMAXREG.DEALLOC.CTAPOOL 0x18", "UTMALDG.2D [UR8], [UR4]", "HGMMA.64x64x16.F32 R0, gdesc[UR4], RZ")
    )["kernel"]
    features = sass_features(instructions)
    assert (features.wgmma, features.mma_sync, features.tma, features.setmaxnreg) == (1, 0, True, True)
    assert sass_features(parse_sass(sass("HMMA.16816.F32 R4, R8, R12, R4"))["kernel"]).mma_sync == 1


def test_warp_specialization_needs_the_op_not_the_loop_attribute():
    assert warp_specialized("ttg.warp_specialize(%a) attributes {}\n default {", "")
    assert not warp_specialized("scf.for ... {tt.warp_specialize}", "")
    assert warp_specialized("", "setmaxnreg.inc.sync.aligned.u32 240;")


def test_the_loop_warps_of_a_warp_specialized_kernel_are_one_consumer_partition():
    ttgir = (
        "module {\n    ttg.warp_specialize(%a)\n    default {\n      ttng.async_tma_copy_global_to_local\n"
        "    }\n    partition0(%x: i32 loc(#loc)) num_warps(4) {\n      %1 = ttng.warp_group_dot %a, %b\n"
        "    }\n    partition1(%x: i32 loc(#loc)) num_warps(4) {\n      %2 = ttng.warp_group_dot %c, %d\n    }\n}"
    )
    assert mma_partitions(ttgir, 4) == (2, 4)  # two consumers of 4 warps, each over half the rows
    assert mma_partitions("%1 = ttng.warp_group_dot %a, %b", 8) == (1, 8)


def test_ptxas_log_gives_registers_spills_stack_and_shared_memory_per_function():
    log = (
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'\n"
        "ptxas info    : Function properties for _Z1kv\n"
        "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 584 bytes cmem[0]\n"
    )
    entry = parse_ptxas_log(log)[("_Z1kv", "sm_90a")]
    assert (entry.registers, entry.spill_bytes, entry.stack_bytes, entry.shared_bytes) == (255, 20, 16, 1024)


def test_resource_usage_of_a_cubin_gives_registers_and_its_stack_frame_as_spills():
    text = (
        "Resource usage:\n Common:\n  GLOBAL:11 CONSTANT[4]:8\n Function attention_fwd_kernel:\n"
        "  REG:168 STACK:8 SHARED:1024 LOCAL:0 CONSTANT[0]:720 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
        " Function other:\n  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0\n"
    )
    entries = parse_resource_usage(text)
    assert set(entries) == {"attention_fwd_kernel", "other"}
    entry = entries["attention_fwd_kernel"]
    assert (entry.registers, entry.spill_bytes, entry.stack_bytes, entry.shared_bytes) == (168, 8, 8, 1024)
    assert entries["other"].spill_bytes == 0


def test_triton_figures_are_those_of_tritons_own_ptxas_run(tmp_path):
    """The report reads the cubin Triton built, so its registers and spills are what Triton's ptxas flags
    (3.9 adds --regAllocOptLevel=2) gave, as its own ptxas log says, not those of a ptxas rerun of ours."""
    job = "TileJob('preprocess', 'half', (64, 0, 4, 1), 'sm_90a', 'padded')"
    script = (
        f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "from triton_static import TileJob, compile_tile\n"
        f"report = compile_tile({job})\n"
        "print('REPORT', report.registers, report.spill_bytes)\n"
    )
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    environment |= dict(TRITON_CACHE_DIR=str(tmp_path), TRITON_DUMP_PTXAS_LOG="1")  # a fresh compile, log shown
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    (entry,) = parse_ptxas_log(result.stdout).values()
    registers, stack = map(int, result.stdout.split("REPORT")[-1].split())
    assert (registers, stack) == (entry.registers, entry.stack_bytes)


def triton_row(arch="sm_90a", spill=0, hmma=0, hgmma=8, **overrides):
    row = dict(source="triton", kernel="fwd", input_class="half", variant="padded", arch=arch, block_m=128)
    row |= dict(block_n=64, num_warps=8, num_stages=2, registers=200, spill_bytes=spill, shared_bytes=98304)
    row |= dict(async_copies=32, tma=False, wgmma=hgmma, mma_sync=hmma, loop_mma=12, warp_specialized=False)
    return row | dict(loop_instructions=400, loop_path=400, per_block=1600.0) | overrides


def test_check_fails_on_hopper_spills_mma_sync_shared_memory_and_synchronous_loads():
    assert problems([triton_row()]) == []
    assert "spills 24 bytes" in problems([triton_row(spill=24)])[0]
    assert "falls back to mma.sync" in problems([triton_row(hmma=64, hgmma=0)])[0]
    assert "shared memory" in problems([triton_row(shared_bytes=300000)])[0]
    assert "not asynchronous" in problems([triton_row(async_copies=0)])[0]
    assert problems([triton_row(async_copies=0, tma=True)]) == []


def test_check_on_ampere_needs_one_spill_free_tile_per_kernel_class_and_layout():
    assert problems([triton_row("sm_80", spill=140, hmma=512), triton_row("sm_80", hmma=256)]) == []
    assert "every tile spills" in problems([triton_row("sm_80", spill=140), triton_row("sm_80", spill=8)])[0]


def test_check_fails_on_a_cuda_spill_and_a_source_that_does_not_compile():
    cuda = dict(source="cuda", file="fwd_d128_bf16.cu", kernel="fwd_kernel", arch="sm_80", spill_bytes=16)
    assert "spills 16 bytes" in problems([cuda | dict(registers=255)])[0]
    assert "ptxas reported nothing" in problems([cuda | dict(registers=None)])[0]
    assert "does not compile" in problems([dict(source="cuda", kernel="x.cu", arch="sm_80", error="boom")])[0]


def test_hopper_only_sources_are_reported_for_sm_90a_alone():
    assert cuda_archs(Path("fwd_sm90_d128_bf16.cu")) == ("sm_90a",)
    assert cuda_archs(Path("fwd_d128_bf16.cu")) == ("sm_80", "sm_90a")


def test_check_compiles_every_kernel_class_and_layout_a_hopper_launch_dispatches():
    """On sm_90a each (kernel, class, layout) at its first tile (what LLM2VEC_FAST_AUTOTUNE=1 runs) with that
    layout's flags, every tile of the swept class in every layout; elsewhere every tile in the first layout."""
    shipped = catalog()
    every_job = triton_jobs(("sm_80", HOPPER))
    jobs = {(job.kernel, job.arch, job.input_class, job.variant, job.spec): job for job in every_job}
    assert len(jobs) == len(every_job), "a tile is compiled twice"
    assert all(job.overrides == shipped.LAYOUTS[job.variant] for job in jobs.values())
    for label, kernel in shipped.KERNELS.items():
        for arch in kernel.archs:
            for input_class, specs in kernel.tables(arch).items():
                for index, spec in enumerate(specs):
                    every = arch == HOPPER and (index == 0 or input_class == SWEPT_CLASS)
                    for layout in kernel.layouts if every else kernel.layouts[:1]:
                        assert (label, arch, input_class, layout, spec) in jobs, (label, arch, input_class, layout)
    # The head-dim-256 dK/dV tile, which once spilled dense and packed only, where the check did not look.
    assert {("dkdv", HOPPER, "half_wide", layout, (16, 64, 8, 2)) for layout in ("dense", "packed")} <= set(jobs)


def run_report(*args):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("args", [["--kernels", "nope"], ["--jobs", "0"], ["--arch", "sm_70"]])
def test_bad_arguments_exit_2_with_one_line(args):
    result = run_report(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("kernel_report.py: error:"), result.stderr


def test_json_report_of_one_kernel_passes_its_check():
    result = run_report("--parts", "triton", "--kernels", "preprocess", "--arch", "sm_90a", "--json", "--check")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert {row["variant"] for row in report["rows"]} == {"padded", "packed"}
    assert all(row["registers"] > 0 and row["spill_bytes"] == 0 for row in report["rows"])
    assert report["problems"] == [] and report["versions"]["triton"]


@pytest.fixture(scope="module")
def hopper_cuda_rows():
    if shutil.which("nvcc") is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc is not on PATH: CI must compile-check csrc/")
        pytest.skip("nvcc is not on PATH (CI fails instead of skipping)")
    sources = [ROOT / "csrc" / "fwd_sm90_d128_bf16.cu", ROOT / "csrc" / "fwd_d128_bf16.cu"]
    return cuda_rows(("sm_80", "sm_90a"), sources)


def test_cuda_report_reads_the_hopper_forward_and_the_mma_sync_forward(hopper_cuda_rows):
    rows = {(row["file"], row["arch"]): row for row in hopper_cuda_rows}
    assert set(rows) == {
        ("fwd_sm90_d128_bf16.cu", "sm_90a"),
        ("fwd_d128_bf16.cu", "sm_80"),
        ("fwd_d128_bf16.cu", "sm_90a"),
    }
    hopper = rows["fwd_sm90_d128_bf16.cu", "sm_90a"]
    assert hopper["wgmma"] and hopper["tma"] and hopper["warp_specialized"] and not hopper["mma_sync"]
    assert hopper["loop_mma"] > 0 and hopper["per_block"] > 0 and hopper["spill_bytes"] == 0
    mma_sync = rows["fwd_d128_bf16.cu", "sm_90a"]
    assert mma_sync["mma_sync"] and not mma_sync["wgmma"] and (mma_sync["block_m"], mma_sync["block_n"]) == (128, 32)
    assert table_row(mma_sync)["tile"] == "128x32 w4"  # configs.cuh: d128 FwdConfig, 128 x 32, 4 warps
    assert problems(hopper_cuda_rows) == []
