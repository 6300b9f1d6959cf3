"""Compile the shipped Triton kernels (kernels/catalog.py) for NVIDIA GPUs on a machine without one and read
what the GPU would run: registers and spills, shared memory, and the SASS of the steady loop.

Triton ships its own ptxas and cuobjdump, so ``triton.compile`` with an explicit ``GPUTarget`` produces
real cubins here. Registers and spills are read from that cubin (``cuobjdump -res-usage``), so they are
what Triton's own ptxas invocation made of the kernel, with the flags of the installed Triton (3.9 adds
``--regAllocOptLevel=2``, which moves several tiles across the spill line), not a ptxas rerun of ours.
Arguments are specialised as a launch on 16-byte-aligned tensors would be (pointers and
strides divisible by 16). Under TRITON_INTERPRET=1 (the test session) every @triton.jit function is an
interpreter function, so compilation runs in worker processes started with the variable cleared
(:func:`compiler_pool`); spawned workers inherit ``sys.path``, so this module must be importable there.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sass_analysis import parse_resource_usage, parse_sass, sass_features, steady_loop

ROOT = Path(__file__).resolve().parents[1]
FLOAT_ARGS = {"qk_scale", "softcap_scale", "sm_scale"}
ARCH_TARGETS = {"sm_80": 80, "sm_90a": 90}
SHARED_LIMIT = {"sm_80": 166912, "sm_90a": 232448}  # bytes of shared memory one block may use
SCORE_BLOCK = 64 * 64  # the unit of the per-block instruction count


@dataclass(frozen=True)
class TileJob:
    """One compilation: a catalog kernel at one tile, input class, architecture and launch variant."""

    kernel: str  # catalog key
    input_class: str
    spec: tuple[int, int, int, int]  # BLOCK_M, BLOCK_N, num_warps, num_stages
    arch: str
    variant: str = "padded"
    overrides: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class TileReport:
    """What one compiled tile holds. ``per_block``: warp-instructions of the steady loop per 64x64 block of
    scores (its path length x warps executing it / 64x64 blocks per iteration); None without an MMA loop."""

    job: TileJob
    registers: int
    spill_bytes: int
    shared_bytes: int
    async_copies: int  # cp.async / cp.async.bulk in the PTX
    wgmma: int  # HGMMA instructions in the SASS
    mma_sync: int  # HMMA instructions in the SASS
    tma: bool  # UTMALDG/UBLKCP/... in the SASS or cp.async.bulk.tensor in the PTX
    warp_specialized: bool  # ttg.warp_specialize in the TTGIR or setmaxnreg in the PTX
    loop_instructions: int  # the steady loop's body
    loop_path: int  # its shortest path through every MMA (sass_analysis.Loop.path)
    loop_mma: int
    loop_warps: int  # warps running the steady loop: num_warps, or one MMA partition's (mma_partitions)
    per_block: float | None
    seconds: float

    def row(self) -> dict:
        """Flat dict for JSON and tables."""
        job = asdict(self.job)
        block_m, block_n, warps, stages = job.pop("spec")
        job.pop("overrides")
        values = {k: v for k, v in asdict(self).items() if k != "job"}
        return (
            dict(source="triton")
            | job
            | dict(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
            | values
        )


@contextmanager
def compiler_pool(workers: int = 1):
    """Worker processes that import Triton with the interpreter off."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_interpreter_off) as pool:
        yield pool


def _interpreter_off() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def catalog():
    """kernels/catalog.py, through the installed package, or from the checkout while it is not installed
    (gpu_session.sh runs the report beside the build); the kernels import nothing from the package."""
    try:
        return importlib.import_module("llm2vec_fast.kernels.catalog")
    except ImportError:
        sys.path.insert(0, str(ROOT))
        return importlib.import_module("kernels.catalog")


def triton_tool(name: str) -> str:
    """A binary Triton's wheel carries (ptxas, cuobjdump, nvdisasm); the newest ptxas where there are two."""
    import triton

    directory = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if name == "ptxas" and os.path.exists(os.path.join(directory, "ptxas-blackwell")):
        return os.path.join(directory, "ptxas-blackwell")
    return os.path.join(directory, name)


def compile_tile(job: TileJob) -> TileReport:
    """Compile `job` and read it (run this in a :func:`compiler_pool` worker)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    kernels = catalog()
    kernel = kernels.KERNELS[job.kernel]
    jit_fn = kernel.function.fn if isinstance(kernel.function, Autotuner) else kernel.function
    block_m, block_n, num_warps, num_stages = job.spec
    flags = kernels.launch_flags(kernel, job.input_class, job.arch, BLOCK_M=block_m, BLOCK_N=block_n, **job.overrides)
    constexprs = {name: value for name, value in flags.items() if name in jit_fn.arg_names}
    unset = [param.name for param in jit_fn.params if param.is_constexpr and param.name not in constexprs]
    if unset:
        raise ValueError(f"{kernel.name} takes constexpr {unset}, which kernels/catalog.py does not set: add them")
    types = kernels.argument_types(kernels.CLASS_INPUT[job.input_class][0])
    signature = {
        name: "constexpr" if name in constexprs else types.get(name, "fp32" if name in FLOAT_ARGS else "i32")
        for name in jit_fn.arg_names
    }
    aligned = {
        (index,): [["tt.divisibility", 16]]
        for index, name in enumerate(jit_fn.arg_names)
        if signature[name].startswith("*") or name.startswith("stride")
    }
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = triton.compile(
            ASTSource(jit_fn, signature, constexprs, aligned),
            target=GPUTarget("cuda", ARCH_TARGETS[job.arch], 32),
            options=dict(num_warps=num_warps, num_stages=num_stages),
        )
    ptx, ttgir = compiled.asm["ptx"], compiled.asm["ttgir"]
    resources = next(iter(parse_resource_usage(_cuobjdump("-res-usage", compiled.asm["cubin"])).values()))
    instructions = next(iter(parse_sass(_cuobjdump("-sass", compiled.asm["cubin"])).values()))
    features = sass_features(instructions)
    loop = steady_loop(instructions)
    partitions, loop_warps = mma_partitions(ttgir, num_warps)
    blocks = block_m * block_n / SCORE_BLOCK / partitions  # the consumer partitions split the tile's rows
    return TileReport(
        job=job,
        registers=resources.registers,
        spill_bytes=resources.spill_bytes,
        shared_bytes=compiled.metadata.shared,
        async_copies=ptx.count("cp.async.cg") + ptx.count("cp.async.ca") + ptx.count("cp.async.bulk"),
        wgmma=features.wgmma,
        mma_sync=features.mma_sync,
        tma=features.tma or "cp.async.bulk.tensor" in ptx,
        warp_specialized=warp_specialized(ttgir, ptx),
        loop_instructions=len(loop.body) if loop else 0,
        loop_path=loop.path if loop else 0,
        loop_mma=loop.mma if loop else 0,
        loop_warps=loop_warps,
        per_block=loop.path * loop_warps / blocks if loop and blocks else None,
        seconds=time.perf_counter() - start,
    )


def warp_specialized(ttgir: str, ptx: str) -> bool:
    """Partitions of warps with roles of their own: a ``ttg.warp_specialize`` op (a loop's bare
    ``tt.warp_specialize`` attribute only asks for one) or register budgets per warpgroup."""
    return "ttg.warp_specialize(" in ttgir or "setmaxnreg" in ptx


def mma_partitions(ttgir: str, num_warps: int) -> tuple[int, int]:
    """(partitions that run dots, warps in each) of a warp-specialized kernel's TTGIR, (1, num_warps) for
    one that is not. Each such partition runs its own copy of the steady loop over its share of the tile's
    rows (Triton's data partitioning), so one copy's length x its warps covers tile blocks / partitions."""
    if "ttg.warp_specialize(" not in ttgir:
        return 1, num_warps
    regions = re.split(r"\n\s*(?=default \{|partition\d+\()", ttgir)[1:]
    warps = []
    for region in regions:
        if any(op in region for op in ("ttng.warp_group_dot ", "tt.dot ", "ttng.tc_gen5_mma ")):
            declared = re.match(r"partition\d+\(.*?num_warps\((\d+)\)", region)
            warps.append(int(declared.group(1)) if declared else num_warps)
    return (len(warps), warps[0]) if warps else (1, num_warps)


def _cuobjdump(option: str, cubin: bytes) -> str:
    """cuobjdump's output for `cubin`; a failure raises naming the command (not an empty dump read as no kernel)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as handle:
        handle.write(cubin)
    try:
        command = [triton_tool("cuobjdump"), option, handle.name]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(handle.name)
