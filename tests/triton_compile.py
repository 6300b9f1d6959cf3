"""Compile Triton kernels for NVIDIA GPUs on a machine without one, and read ptxas's resource report.

Triton ships its own ptxas, so ``triton.compile`` with an explicit ``GPUTarget`` produces real
cubins here. Arguments are specialised as a launch on 16-byte-aligned tensors would be, so the
report shows what the GPU will run: registers, spilled bytes, shared memory, async copies.

The test session runs Triton's interpreter (TRITON_INTERPRET=1 turns every @triton.jit function,
Triton's own standard library included, into an interpreter function), so compilation happens in
a separate process started with the variable cleared: see :func:`compiler_process`.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

FLOAT_ARGS = {"qk_scale", "softcap_scale", "sm_scale"}
ARCH_NAMES = {80: "sm_80", 90: "sm_90a"}


@dataclass(frozen=True)
class CompileReport:
    registers: int
    spill_bytes: int
    shared_bytes: int
    async_copies: int


@contextmanager
def compiler_process():
    """A one-worker process pool whose worker imports Triton with the interpreter off."""
    previous = os.environ.pop("TRITON_INTERPRET", None)
    try:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(os.getpid).result()  # start the worker while the variable is cleared
    finally:
        if previous is not None:
            os.environ["TRITON_INTERPRET"] = previous
    with pool:
        yield pool


def _kernel(name: str):
    from llm2vec_fast.kernels import attention_bwd, attention_fwd

    return getattr(attention_fwd if name.startswith("attention_fwd") else attention_bwd, name)


def compile_kernel(
    kernel_name: str, pointer_types: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int
) -> CompileReport:
    """Compile ``llm2vec_fast.kernels`` kernel `kernel_name` (run this inside :func:`compiler_process`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    kernel = _kernel(kernel_name)
    jit_fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    signature = {
        name: "constexpr" if name in constexprs else pointer_types.get(name, "fp32" if name in FLOAT_ARGS else "i32")
        for name in jit_fn.arg_names
    }
    aligned = {
        (index,): [["tt.divisibility", 16]]
        for index, name in enumerate(jit_fn.arg_names)
        if signature[name].startswith("*") or name.startswith("stride")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = triton.compile(
            ASTSource(jit_fn, signature, constexprs, aligned),
            target=GPUTarget("cuda", arch, 32),
            options=dict(num_warps=num_warps, num_stages=num_stages),
        )
    ptx = compiled.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        report = subprocess.run(
            [_ptxas(triton), f"-arch={ARCH_NAMES[arch]}", "-v", handle.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    finally:
        os.unlink(handle.name)
    return CompileReport(
        registers=int(re.findall(r"Used (\d+) registers", report)[-1]),
        spill_bytes=sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report)),
        shared_bytes=compiled.metadata.shared,
        async_copies=ptx.count("cp.async.cg") + ptx.count("cp.async.ca") + ptx.count("cp.async.bulk"),
    )


def _ptxas(triton) -> str:
    """Triton's newest bundled ptxas (named ptxas-blackwell in recent wheels, plain ptxas before)."""
    directory = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    newest = os.path.join(directory, "ptxas-blackwell")
    return newest if os.path.exists(newest) else os.path.join(directory, "ptxas")
