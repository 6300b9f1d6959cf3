"""The CUDA sources of csrc/ compile, and their kernels neither spill nor use local memory.

Every ``.cu`` in csrc/ is compiled with plain nvcc for sm_80 and sm_90a (``-Xptxas -v``, the
flags setup.py builds with), in parallel; the ptxas report must name the kernels each file is
meant to hold and show 0 spill bytes and a 0-byte stack frame for every one (a stack frame
means a register array went to local memory). The torch binding is syntax-checked against the
installed torch headers. Needs no GPU: runs in CI, where nvcc is on PATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
ARCHS = ("sm_80", "sm_90a")
GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]
# The Hopper forward and backward (csrc/fwd_sm90_*.cu, bwd_sm90_*.cu) are built for sm_90a alone, as setup.py builds
# them.
HOPPER_PREFIX = "fwd_sm90_"
HOPPER_BWD_PREFIX = "bwd_sm90_"
HOPPER_PREFIXES = (HOPPER_PREFIX, HOPPER_BWD_PREFIX)
HOPPER_GENCODE = ["-gencode", "arch=compute_90a,code=sm_90a"]
# Their register budgets after setmaxnreg (HopperFwdConfig and HopperBwdConfig in csrc/flash_attn/hopper/).
HOPPER_PRODUCER_REGS, HOPPER_CONSUMER_REGS = 24, 240
# The persistent dK/dV kernel's producer (HopperBwdConfig) keeps its work-tile loop's state in 32 (24 spill it).
HOPPER_DKDV_PRODUCER_REGS = 32
NVCC_FLAGS = ["-std=c++20", "-O3", "-lineinfo", f"-I{CSRC}", "-Xptxas", "-v"]
# The kernels each file must hold, by the name they carry in their mangled symbol.
EXPECTED_KERNELS = {
    HOPPER_PREFIX: {"fwd_sm90_kernel"},
    HOPPER_BWD_PREFIX: {"bwd_sm90_kernel", "bwd_dq_sm90_kernel"},  # the preprocess is the sm80 objects' (bwd_d*.cu)
    "fwd_": {"fwd_kernel"},
    "bwd_": {"bwd_preprocess_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel"},
    "mask_bits": {"pack_key_bits_kernel"},
}


@dataclass
class KernelReport:
    symbol: str
    arch: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int

    @property
    def kernel(self) -> str:
        match = re.search(
            r"(fwd_sm90_kernel|bwd_sm90_kernel|bwd_dq_sm90_kernel|fwd_kernel|bwd_preprocess_kernel|bwd_dkdv_kernel"
            r"|bwd_dq_kernel|pack_key_bits_kernel)",
            self.symbol,
        )
        return match.group(1) if match else self.symbol


def parse_ptxas(log: str) -> list[KernelReport]:
    """Kernel entries of a `-Xptxas -v` log: registers, stack frame and spills, per arch."""
    reports, current = [], None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line)
        if entry:
            current = KernelReport(entry.group(1), entry.group(2), -1, -1, -1, -1)
            reports.append(current)
            continue
        if current is None:
            continue
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame:
            current.stack_bytes, current.spill_store_bytes, current.spill_load_bytes = map(int, frame.groups())
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current.registers = int(used.group(1))
    return reports


def nvcc_or_skip() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("CI"):
            pytest.fail("nvcc is not on PATH: CI must compile-check csrc/ (install the CUDA toolkit's nvcc)")
        pytest.skip("nvcc is not on PATH (CI fails instead of skipping)")
    return nvcc


def archs_of(source: Path) -> tuple[str, ...]:
    return ("sm_90a",) if source.name.startswith(HOPPER_PREFIXES) else ARCHS


def compile_cu(nvcc: str, source: Path, out_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    gencode = HOPPER_GENCODE if source.name.startswith(HOPPER_PREFIXES) else GENCODE
    command = [nvcc, *NVCC_FLAGS, *gencode, "-c", str(source), "-o", str(out_dir / (source.stem + ".o"))]
    return source, subprocess.run(command, capture_output=True, text=True)


def cuda_include_dirs() -> list[str]:
    """The CUDA runtime header directories nvcc itself uses (from its --dryrun INCLUDES line)."""
    dryrun = subprocess.run(
        [shutil.which("nvcc"), "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
        capture_output=True,
        text=True,
    )
    line = next((line for line in dryrun.stderr.splitlines() if "INCLUDES=" in line), "")
    return re.findall(r'-I"?([^"\s]+)', line)


def syntax_check_binding(out_dir: Path) -> subprocess.CompletedProcess | None:
    """g++ -fsyntax-only of flash_api.cpp against the installed torch headers, the CUDA runtime
    headers of the nvcc toolkit and Python's; None when torch is not installed."""
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return None
    includes = [*include_paths(), sysconfig.get_paths()["include"], *cuda_include_dirs()]
    command = [
        shutil.which("g++") or "g++",
        "-std=c++20",
        "-fsyntax-only",
        f"-I{CSRC}",
        # CPU wheels of torch lack this generated header; it only sets export macros.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        "-DLLM2VEC_FAST_SM90",  # as setup.py builds it with the Hopper forward: both dispatch paths
        *[arg for path in includes for arg in ("-isystem", path)],
        str(CSRC / "flash_api.cpp"),
    ]
    return subprocess.run(command, capture_output=True, text=True)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """(nvcc results per .cu file, binding syntax check), all run in parallel."""
    nvcc = nvcc_or_skip()
    out_dir = tmp_path_factory.mktemp("nvcc")
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, f"no .cu files in {CSRC}"
    with ThreadPoolExecutor(max_workers=len(sources) + 1) as pool:
        binding = pool.submit(syntax_check_binding, out_dir)
        results = dict(pool.map(lambda source: compile_cu(nvcc, source, out_dir), sources))
        return results, binding.result()


def test_every_source_compiles(builds):
    results, _ = builds
    failed = {source.name: result.stderr[-3000:] for source, result in results.items() if result.returncode != 0}
    assert not failed, f"nvcc failed: {failed}"


def test_kernels_do_not_spill(builds):
    results, _ = builds
    rows, problems = [], []
    for source, result in sorted(results.items()):
        reports = parse_ptxas(result.stderr)
        expected = next(kernels for prefix, kernels in EXPECTED_KERNELS.items() if source.name.startswith(prefix))
        for arch in archs_of(source):
            found = {report.kernel for report in reports if report.arch == arch}
            if not expected <= found:
                problems.append(
                    f"{source.name} {arch}: expected kernels {sorted(expected)}, ptxas reported {sorted(found)}"
                )
        for report in reports:
            rows.append(
                f"{source.name:20} {report.arch:7} {report.kernel:22} {report.registers:4} regs "
                f"stack {report.stack_bytes} spill {report.spill_store_bytes}/{report.spill_load_bytes}"
            )
            if -1 in (report.registers, report.stack_bytes):
                problems.append(f"{source.name} {report.arch} {report.kernel}: incomplete ptxas report")
            if report.spill_store_bytes or report.spill_load_bytes or report.stack_bytes:
                problems.append(
                    f"{source.name} {report.arch} {report.kernel}: {report.stack_bytes} bytes stack frame, "
                    f"{report.spill_store_bytes}/{report.spill_load_bytes} bytes spilled"
                )
    print("\n".join(rows), file=sys.stderr)
    assert not problems, "\n".join(problems)


def cuobjdump_or_skip() -> Path:
    """Triton's wheel carries cuobjdump (the CUDA toolkit here may not)."""
    try:
        import triton
    except ImportError:
        pytest.skip("triton is not installed: no cuobjdump to disassemble with")
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        pytest.skip(f"no cuobjdump in the triton wheel ({tool})")
    return tool


def sass_loops(sass: str) -> tuple[list[tuple[int, str]], list[tuple[int, int]]]:
    """(address, instruction) of every SASS line, and the [target, branch] address spans of backward branches,
    leaving out branches placed after the kernel's last EXIT (ptxas's out-of-line mbarrier retry paths jump
    back into the code they left: no loop)."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    last_exit = max((a for a, i in lines if re.match(r"(@!?U?P\w+\s+)?EXIT\b", i)), default=0)
    loops = []
    for address, instruction in lines:
        branch = re.search(r"\bBRA(?:\.\S+)?\s+(?:\S+,\s*)?0x([0-9a-f]+)", instruction)
        if branch and int(branch.group(1), 16) < address < last_exit:
            loops.append((int(branch.group(1), 16), address))
    return lines, loops


def function_sass(sass: str, symbol: str) -> str:
    """The SASS of the one function of a cuobjdump listing whose mangled name matches the regex `symbol`."""
    parts = re.split(r"\n\s*Function : (\S+)", sass)
    found = [body for name, body in zip(parts[1::2], parts[2::2]) if re.search(symbol, name)]
    assert len(found) == 1, f"{len(found)} functions match {symbol!r}"
    return found[0]


def check_hopper_sass(
    builds, prefix: str, symbol: str, forms: dict, absent: dict | None = None, producer_regs: int = HOPPER_PRODUCER_REGS
) -> None:
    """In the function whose mangled name matches `symbol` of each csrc/{prefix}*.cu: every instruction form of
    `forms` (name: (matches, at least how many)) inside one loop, none of `absent` (name: matches) anywhere, the
    setmaxnreg budgets of its configuration, and ptxas honouring them (no warning C7508) without serializing
    wgmma for want of registers (C7512)."""
    results, _ = builds
    tool = cuobjdump_or_skip()
    hopper = {source: result for source, result in results.items() if source.name.startswith(prefix)}
    assert hopper, f"no {prefix}*.cu in {CSRC}"
    rows, problems = [], []
    for source, result in sorted(hopper.items()):
        assert result.returncode == 0, f"{source.name} did not compile"
        if "C7508" in result.stderr:
            problems.append(f"{source.name}: ptxas ignored setmaxnreg (C7508)")
        if "C7512" in result.stderr:
            problems.append(f"{source.name}: ptxas serialized wgmma for want of registers (C7512)")
        obj = result.args[result.args.index("-o") + 1]
        dump = subprocess.run([str(tool), "--dump-sass", obj], capture_output=True, text=True, check=True).stdout
        sass = function_sass(dump, symbol)
        lines, loops = sass_loops(sass)
        for name, (matches, at_least) in forms.items():
            in_a_loop = any(sum(lo <= a <= hi and matches(i) for a, i in lines) >= at_least for lo, hi in loops)
            if not in_a_loop:
                problems.append(f"{source.name}: no loop issues {at_least}+ {name}")
        for name, matches in (absent or {}).items():
            if any(matches(i) for _, i in lines):
                problems.append(f"{source.name}: {symbol} issues {name}")
        setmaxnreg = r"USETMAXREG\.(?:DEALLOC|TRY_ALLOC)\S*\s+(?:UP\d+,\s*)?0x([0-9a-f]+)"
        budgets = [int(v, 16) for v in re.findall(setmaxnreg, sass)]
        if sorted(budgets) != sorted([producer_regs, HOPPER_CONSUMER_REGS]):
            problems.append(f"{source.name}: setmaxnreg budgets {budgets} in SASS")
        entry = next(r.registers for r in parse_ptxas(result.stderr) if re.search(symbol, r.symbol))
        count = {op: sum(i.startswith(op) for _, i in lines) for op in ("HGMMA", "UTMALDG")}
        rows.append(
            f"{source.name:24} {symbol}: sm_90a entry {entry} regs; producer warpgroup {producer_regs}, "
            f"consumers {HOPPER_CONSUMER_REGS} after setmaxnreg; {count['HGMMA']} HGMMA, {count['UTMALDG']} UTMALDG"
        )
    print("\n".join(rows), file=sys.stderr)
    assert not problems, "\n".join(problems)


def test_hopper_forward_sass(builds):
    """The sm_90a forward issues wgmma in both forms (HGMMA with A from shared memory for Q K^T, from
    registers for P V) and TMA loads (UTMALDG) inside loops."""
    forms = {
        "HGMMA SS (Q K^T)": (lambda i: re.match(r"HGMMA\.\S+ R\d+, gdesc", i) is not None, 1),
        "HGMMA RS (P V)": (lambda i: re.match(r"HGMMA\.\S+ R\d+, R\d+, gdesc", i) is not None, 1),
        "UTMALDG (K and V)": (lambda i: i.startswith("UTMALDG"), 2),
    }
    check_hopper_sass(builds, HOPPER_PREFIX, "fwd_sm90_kernel", forms)


def test_hopper_backward_sass(builds):
    """The sm_90a backward's query-tile loop issues wgmma from shared memory (S^T = K Q^T, dP^T = V dO^T,
    dQ = dS K) and from registers (dV += P^T dO, dK += dS^T Q), and the producer's loop TMA-loads Q and dO;
    the consumers' loop adds dQ with float reductions to global memory (RED)."""
    forms = {
        "HGMMA SS (S^T, dP^T, dQ)": (lambda i: re.match(r"HGMMA\.\S+ R\d+, gdesc", i) is not None, 3),
        "HGMMA RS (dV, dK)": (lambda i: re.match(r"HGMMA\.\S+ R\d+, R\d+, gdesc", i) is not None, 2),
        "UTMALDG (Q and dO)": (lambda i: i.startswith("UTMALDG"), 2),
        "RED ADD.F32 (dQ atomics)": (lambda i: re.match(r"REDG?\.E\.ADD\.F32", i) is not None, 1),
    }
    check_hopper_sass(builds, HOPPER_BWD_PREFIX, r"bwd_sm90_kernel.*Lb1E", forms, None, HOPPER_DKDV_PRODUCER_REGS)


HGMMA_SS = re.compile(r"HGMMA\.\S+ R\d+, gdesc")
HGMMA_RS = re.compile(r"HGMMA\.\S+ R\d+, R\d+, gdesc")
GLOBAL_REDUCTIONS = {"RED/ATOM (a dQ writer that is not the only one)": lambda i: re.match(r"(REDG?|ATOMG?)\.", i)}


def test_hopper_deterministic_dkdv_sass(builds):
    """The deterministic path's dK/dV kernel (no dQ product): wgmma from shared memory (S^T, dP^T) and from
    registers (dV, dK) and TMA loads in loops, and no reduction to global memory at all."""
    forms = {
        "HGMMA SS (S^T, dP^T)": (lambda i: HGMMA_SS.match(i) is not None, 2),
        "HGMMA RS (dV, dK)": (lambda i: HGMMA_RS.match(i) is not None, 2),
        "UTMALDG (Q and dO)": (lambda i: i.startswith("UTMALDG"), 2),
    }
    check_hopper_sass(
        builds, HOPPER_BWD_PREFIX, r"bwd_sm90_kernel.*Lb0E", forms, GLOBAL_REDUCTIONS, HOPPER_DKDV_PRODUCER_REGS
    )


def test_hopper_dq_sass(builds):
    """The deterministic path's dQ kernel: wgmma from shared memory (S, dP) and from registers (dQ += dS K) and
    TMA loads of K and V in loops; every dQ element is a plain store (no reduction to global memory)."""
    forms = {
        "HGMMA SS (S, dP)": (lambda i: HGMMA_SS.match(i) is not None, 2),
        "HGMMA RS (dQ)": (lambda i: HGMMA_RS.match(i) is not None, 1),
        "UTMALDG (K and V)": (lambda i: i.startswith("UTMALDG"), 2),
    }
    check_hopper_sass(builds, HOPPER_BWD_PREFIX, "bwd_dq_sm90_kernel", forms, GLOBAL_REDUCTIONS)


def test_ptx_sm90_layer_assembles(tmp_path):
    """Every wrapper of csrc/flash_attn/ptx_sm90.cuh, through the emulator's test pipeline
    (tests/cuda_emulator/sm90_pipeline.cu), assembles for sm_90a into the Hopper instructions
    meant: wgmma in both forms and every N, TMA loads of 2-4 dimensions, a TMA store and
    prefetch, mbarrier SYNCS, setmaxnreg with its budgets, named barriers, the proxy fence and
    elect; no spills."""
    nvcc, tool = nvcc_or_skip(), cuobjdump_or_skip()
    source = Path(__file__).resolve().parent / "cuda_emulator" / "sm90_pipeline.cu"
    obj = tmp_path / "sm90_pipeline.o"
    command = [nvcc, *NVCC_FLAGS, f"-I{source.parent}", *HOPPER_GENCODE, "-c", str(source), "-o", str(obj)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = parse_ptxas(result.stderr)
    assert len(reports) == 2 + 2 * 6, result.stderr  # the pipeline and each wgmma shape, fp16 and bf16
    for report in reports:
        assert (report.stack_bytes, report.spill_store_bytes, report.spill_load_bytes) == (0, 0, 0), report
    assert "C7508" not in result.stderr, "ptxas ignored setmaxnreg"
    sass = subprocess.run([str(tool), "--dump-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    instructions = [i for _, i in sass_loops(sass)[0]]
    expected = {
        "wgmma SS": r"HGMMA\.64x64x16\.F32\S* R\d+, gdesc",
        "wgmma RS, B N-major": r"HGMMA\.64x64x16\.F32\S* R\d+, R\d+, gdesc\[UR\d+\]\.tnspB",
        "TMA load 2-D": r"UTMALDG\.2D",
        "TMA load 3-D": r"UTMALDG\.3D",
        "TMA load 4-D": r"UTMALDG\.4D",
        "TMA store": r"UTMASTG\.2D",
        "tensor map prefetch": r"UTMACCTL\.PF",
        "mbarrier arrive": r"SYNCS\.ARRIVE\.TRANS64",
        "mbarrier try_wait.parity": r"SYNCS\.PHASECHK\.TRANS64\.TRYWAIT",
        "wgmma fence / wait": r"WARPGROUP\.(ARRIVE|DEPBAR)",
        "setmaxnreg.dec 40": r"USETMAXREG\.DEALLOC\S* 0x28\b",
        "setmaxnreg.inc 232": r"USETMAXREG\.TRY_ALLOC\S* (UP\d+, )?0xe8\b",
        "bar.sync / bar.arrive": r"BAR\.(SYNC|ARV)",
        "fence.proxy.async": r"FENCE\.VIEW\.ASYNC\.S",
        "elect.sync": r"ELECT",
    }
    for n in (64, 96, 128, 176, 192, 256):
        expected[f"wgmma N={n}"] = rf"HGMMA\.64x{n}x16\.F32\.BF16 R\d+, R\d+, gdesc"
    missing = [name for name, pattern in expected.items() if not any(re.match(pattern, i) for i in instructions)]
    assert not missing, f"SASS of sm90_pipeline.cu lacks {missing}"


def test_binding_compiles_against_torch_headers(builds):
    _, binding = builds
    if binding is None:
        pytest.skip("torch is not installed: no headers to check the binding against")
    assert binding.returncode == 0, f"g++ -fsyntax-only csrc/flash_api.cpp failed:\n{binding.stderr[-3000:]}"


def test_parse_ptxas_reads_spills():
    log = (
        "ptxas info    : Compiling entry function '_ZN4l2vf10fwd_kernelIiEEvv' for 'sm_80'\n"
        "ptxas info    : Function properties for _ZN4l2vf10fwd_kernelIiEEvv\n"
        "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 584 bytes cmem[0]\n"
    )
    (report,) = parse_ptxas(log)
    assert (report.kernel, report.arch, report.registers) == ("fwd_kernel", "sm_80", 255)
    assert (report.stack_bytes, report.spill_store_bytes, report.spill_load_bytes) == (16, 8, 12)
