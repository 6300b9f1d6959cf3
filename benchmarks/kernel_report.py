"""Static performance report: compile every shipped kernel with no GPU and read what the GPU would run.

    python benchmarks/kernel_report.py [--arch sm_90a|sm_80] [--json] [--check] [--jobs 2]

Triton: every tile of every kernel in kernels/catalog.py, for each architecture it ships on, at each batch
layout its launches specialise on (padded, dense, packed; the dense and packed layouts on sm_90a for the
16-bit d128 class, the one the benchmarks time). CUDA: every csrc/*.cu, compiled by nvcc like setup.py does.
Per kernel and tile: registers, spilled bytes, shared memory, whether the SASS uses wgmma (HGMMA), TMA
(UTMALDG/UBLKCP, or cp.async.bulk.tensor in the PTX), warp specialization (ttg.warp_specialize in the
TTGIR, or setmaxnreg) or mma.sync (HMMA), and the steady loop's warp-instructions per 64x64 block of
scores (SASS loop length x warps executing it / 64x64 blocks per iteration, the length being the
shortest path through the loop body that runs all its MMA instructions; the whole body is printed too;
how the loop is found and where the count is rough: benchmarks/sass_analysis.py). The count is a
figure, like a timing: issue 10's goal is <= 960 for the Hopper forward.

--check exits 1 naming each problem: a spill (or stack frame) in a Hopper Triton tile or any CUDA kernel;
a Triton sm_80 (kernel, class, layout) without one spill-free tile (Ampere shares its tables with Hopper
today and the autotuner times every candidate, so a spilling tile only loses there); shared memory over
the block limit; a Triton tile whose loads are not asynchronous; a shipped Triton Hopper tile holding
mma.sync (HMMA: a dot below wgmma's 64-row minimum, or an unsupported layout). tests/test_triton_compile.py
runs the same checks over the Triton catalog in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sass_analysis import parse_ptxas_log, parse_sass, sass_features, steady_loop  # noqa: E402
from triton_static import (  # noqa: E402
    SCORE_BLOCK,
    SHARED_LIMIT,
    TileJob,
    catalog,
    compile_tile,
    compiler_pool,
    triton_tool,
)

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("sm_80", "sm_90a")
HOPPER = "sm_90a"
SWEPT_CLASS = "half"  # the input class whose every tile --check compiles in every layout on sm_90a
NVCC_FLAGS = ["-std=c++20", "-O3", "-lineinfo", "-Xptxas", "-v"]  # setup.py's (torch adds -std=c++20)
# Score tile (query rows, keys) and warps of each CUDA kernel, read from its config's template arguments.
CUDA_TILES = [
    (re.compile(r"FwdConfig<[\w:]+, (\d+), (\d+), (\d+), (\d+), (\d+)>"), lambda d, m, n, w, s: (m, n, w)),
    (re.compile(r"BwdKVConfig<[\w:]+, (\d+), (\d+), (\d+), (\d+)>"), lambda d, m, w, s: (m, 16 * w, w)),
    (re.compile(r"BwdQConfig<[\w:]+, (\d+), (\d+), (\d+), (\d+), (\d+)>"), lambda d, m, n, w, s: (m, n, w)),
    # Hopper forward: two consumer warpgroups of 64 rows run the MMA loop (the producer warpgroup its own).
    (re.compile(r"HopperFwdConfig<[\w:]+, (\d+), (\d+), (\d+)>"), lambda d, n, s: (128, n, 8)),
    # Hopper backward: BLOCK_M queries against 128 keys, two consumer warpgroups of 64 keys each.
    (re.compile(r"HopperBwdConfig<[\w:]+, (\d+), (\d+), (\d+)>"), lambda d, m, s: (m, 128, 8)),
    # Hopper dQ (deterministic path): 128 queries, two consumer warpgroups of 64 rows, against BLOCK_N keys.
    (re.compile(r"HopperDqConfig<[\w:]+, (\d+), (\d+), (\d+)>"), lambda d, n, s: (128, n, 8)),
]
COLUMNS = [
    "kernel",
    "arch",
    "class",
    "layout",
    "tile",
    "regs",
    "spill",
    "smem_kb",
    "wgmma",
    "tma",
    "ws",
    "mma_sync",
    "loop_len",
    "loop_path",
    "loop_mma",
    "per_64x64",
]


def triton_jobs(archs: tuple[str, ...], kernels: list[str] | None = None) -> list[TileJob]:
    """Every shipped tile of the catalog in its kernel's first layout; on sm_90a also every (kernel, class,
    layout) a launch there dispatches: each class's first tile (what LLM2VEC_FAST_AUTOTUNE=1 runs) in every
    layout, and every tile in every layout for the 16-bit d128 class (the one the benchmarks time)."""
    shipped = catalog()
    jobs = []
    for label, kernel in shipped.KERNELS.items():
        if kernels and label not in kernels:
            continue
        for arch in (arch for arch in kernel.archs if arch in archs):
            for input_class, specs in kernel.tables(arch).items():
                for index, spec in enumerate(specs):
                    every = arch == HOPPER and (index == 0 or input_class == SWEPT_CLASS)
                    layouts = kernel.layouts if every else kernel.layouts[:1]
                    jobs += [TileJob(label, input_class, spec, arch, name, shipped.LAYOUTS[name]) for name in layouts]
    return jobs


def triton_rows(jobs: list[TileJob], workers: int) -> list[dict]:
    """Report rows of `jobs`; a tile that fails to compile is a row naming the error (--check fails on it)."""
    with compiler_pool(workers) as pool:
        futures = [(job, pool.submit(compile_tile, job)) for job in jobs]
        return [_triton_row(job, future) for job, future in futures]


def _triton_row(job: TileJob, future) -> dict:
    try:
        return future.result().row()
    except Exception as error:  # a compiler error of any kind: keep the other tiles' figures
        block_m, block_n, warps, stages = job.spec
        tile = dict(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
        message = (str(error).strip().splitlines() or [type(error).__name__])[-1][:160]
        return (
            dict(source="triton", kernel=job.kernel, input_class=job.input_class, arch=job.arch)
            | tile
            | dict(variant=job.variant, error=message)
        )


def cuda_archs(source: Path) -> tuple[str, ...]:
    """The architectures a csrc/ file is built for: Hopper-only sources say so in their name."""
    return (HOPPER,) if re.search(r"sm90|hopper", source.stem) else ARCHS


def cuda_rows(archs: tuple[str, ...], sources: list[Path] | None = None, workers: int = 2) -> list[dict]:
    """One row per kernel of each csrc/*.cu per architecture; a file nvcc rejects is one row saying so."""
    sources = sources if sources is not None else sorted((ROOT / "csrc").glob("*.cu"))
    builds = [(source, arch) for source in sources for arch in cuda_archs(source) if arch in archs]
    with tempfile.TemporaryDirectory() as scratch, ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda build: _cuda_build(*build, Path(scratch)), builds)
        return [row for rows in results for row in rows]


def _cuda_build(source: Path, arch: str, scratch: Path) -> list[dict]:
    cubin = scratch / f"{source.stem}.{arch}.cubin"
    gencode = f"arch=compute_{arch[3:]},code={arch}"
    command = [_nvcc(), *NVCC_FLAGS, f"-I{ROOT / 'csrc'}", "-gencode", gencode, "-cubin", str(source), "-o", str(cubin)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return [
            dict(
                source="cuda",
                file=source.name,
                kernel=source.name,
                arch=arch,
                error=(result.stderr.strip().splitlines() or ["?"])[-1][:160],
            )
        ]
    resources = {name: entry for (name, _), entry in parse_ptxas_log(result.stderr).items()}
    sass = subprocess.run([triton_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    return [_cuda_row(source, arch, name, instructions, resources) for name, instructions in parse_sass(sass).items()]


def _cuda_row(source: Path, arch: str, name: str, instructions, resources) -> dict:
    features, loop = sass_features(instructions), steady_loop(instructions)
    entry, readable = resources.get(name), _demangle(name)
    rows, cols, warps = next(
        (rule(*map(int, match.groups())) for pattern, rule in CUDA_TILES if (match := pattern.search(readable))),
        (0, 0, 0),
    )
    return dict(
        source="cuda",
        file=source.name,
        kernel=re.sub(r"^void |\(.*$", "", readable).replace("l2vf::", ""),
        arch=arch,
        block_m=rows,
        block_n=cols,
        num_warps=warps,
        registers=entry.registers if entry else None,
        spill_bytes=entry.spill_bytes + entry.stack_bytes if entry else None,
        shared_bytes=entry.shared_bytes if entry else None,  # static only: the kernels size theirs at launch
        wgmma=features.wgmma,
        mma_sync=features.mma_sync,
        tma=features.tma,
        warp_specialized=features.setmaxnreg,
        loop_instructions=len(loop.body) if loop else 0,
        loop_path=loop.path if loop else 0,
        loop_mma=loop.mma if loop else 0,
        loop_warps=warps,
        per_block=loop.path * warps * SCORE_BLOCK / (rows * cols) if loop and rows * cols else None,
    )


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc is not on PATH: the CUDA part of the report needs it (or pass --parts triton)")
    return nvcc


def _demangle(name: str) -> str:
    """The C++ name of a mangled kernel symbol (c++filt; the symbol itself without it)."""
    filt = shutil.which("c++filt")
    if filt is None:
        return name
    return subprocess.run([filt, name], capture_output=True, text=True).stdout.strip() or name


def problems(rows: list[dict]) -> list[str]:
    """What --check fails on (module docstring), one line each."""
    found = []
    for row in rows:
        where = row_label(row)
        if "error" in row:
            found.append(f"{where}: does not compile: {row['error']}")
            continue
        triton, arch = row.get("source") == "triton", row["arch"]
        if row["registers"] is None:
            found.append(f"{where}: ptxas reported nothing for it")
            continue
        if row["spill_bytes"] and (arch == HOPPER or not triton):
            found.append(f"{where}: spills {row['spill_bytes']} bytes")
        if triton and row["shared_bytes"] > SHARED_LIMIT[arch]:
            found.append(f"{where}: {row['shared_bytes']} bytes of shared memory, over {SHARED_LIMIT[arch]}")
        if triton and row["loop_mma"] and not (row["async_copies"] or row["tma"]):
            found.append(f"{where}: loads are not asynchronous (no cp.async, no TMA)")
        if triton and arch == HOPPER and row["mma_sync"]:
            found.append(f"{where}: falls back to mma.sync ({row['mma_sync']} HMMA, {row['wgmma']} HGMMA)")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("source") == "triton" and row["arch"] != HOPPER and "error" not in row:
            groups.setdefault((row["kernel"], row["arch"], row["input_class"], row["variant"]), []).append(row)
    for (kernel, arch, input_class, layout), group in groups.items():
        if all(row["spill_bytes"] for row in group):
            found.append(f"triton {kernel} {arch} {input_class} {layout}: every tile spills")
    return found


def row_label(row: dict) -> str:
    if row.get("source") == "cuda":
        return f"cuda {row.get('file', '')} {row['kernel']} {row['arch']}"
    tile = f"{row['block_m']}x{row['block_n']} w{row['num_warps']} s{row['num_stages']}"
    return f"triton {row['kernel']} {row['arch']} {row['input_class']} {row['variant']} {tile}"


def table_row(row: dict) -> dict:
    """A report row in the printed table's columns."""
    if "error" in row:
        return dict(
            kernel=row["kernel"], arch=row["arch"], layout=row.get("variant", "-"), tile=f"error: {row['error']}"
        )
    cuda = row.get("source") == "cuda"
    tile = f"{row['block_m']}x{row['block_n']} w{row['num_warps']}" + ("" if cuda else f" s{row['num_stages']}")
    kernel = f"{row['file'].removesuffix('.cu')}: {row['kernel']}" if cuda else row["kernel"]
    return {
        "kernel": kernel,
        "arch": row["arch"],
        "class": "-" if cuda else row["input_class"],
        "layout": "-" if cuda else row["variant"],
        "tile": tile if row["block_m"] else "-",
        "regs": row["registers"],
        "spill": row["spill_bytes"],
        "smem_kb": round(row["shared_bytes"] / 1024, 1) if row["shared_bytes"] is not None else "-",
        "wgmma": "yes" if row["wgmma"] else "no",
        "tma": "yes" if row["tma"] else "no",
        "ws": "yes" if row["warp_specialized"] else "no",
        "mma_sync": "yes" if row["mma_sync"] else "no",
        "loop_len": row["loop_instructions"] or "-",
        "loop_path": row["loop_path"] or "-",
        "loop_mma": row["loop_mma"] or "-",
        "per_64x64": round(row["per_block"]) if row["per_block"] else "-",
    }


def versions() -> dict:
    import triton

    nvcc = shutil.which("nvcc")
    release = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else ""
    match = re.search(r"release ([\d.]+)", release)
    return dict(triton=triton.__version__, nvcc=match.group(1) if match else None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHS, help="one architecture (default: both)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    parser.add_argument("--check", action="store_true", help="exit 1 on a spill or a Hopper mma.sync tile")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compilations (default 2)")
    parser.add_argument("--parts", nargs="+", choices=["triton", "cuda"], default=["triton", "cuda"])
    parser.add_argument("--kernels", nargs="+", help="catalog keys of the Triton kernels to compile (default all)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    known = catalog().KERNELS
    unknown = sorted(set(args.kernels or []) - set(known))
    if unknown:
        parser.error(f"unknown Triton kernels {unknown}; the catalog has {sorted(known)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    archs = (args.arch,) if args.arch else ARCHS
    start = time.perf_counter()
    rows = []
    try:
        if "triton" in args.parts:
            rows += triton_rows(triton_jobs(archs, args.kernels), args.jobs)
        if "cuda" in args.parts:
            rows += cuda_rows(archs, workers=args.jobs)
    except (FileNotFoundError, ValueError, subprocess.CalledProcessError) as error:
        print(f"kernel_report: {error}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    found = problems(rows)
    if args.json:
        print(json.dumps(dict(versions=versions(), seconds=round(seconds, 1), rows=rows, problems=found), indent=1))
    else:
        from reporting import markdown_table

        print(f"{versions()}, {len(rows)} kernels and tiles in {seconds:.0f} s with {args.jobs} jobs")
        print(markdown_table([table_row(row) for row in rows], COLUMNS))
    for problem in found if args.check else []:
        print(f"kernel_report --check: {problem}", file=sys.stderr)
    return 1 if args.check and found else 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.exit(main())
