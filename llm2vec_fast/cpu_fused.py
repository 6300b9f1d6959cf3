"""Fused float32 CPU ops for the token-wise parts of a decoder layer: RMSNorm, SwiGLU's ``silu(gate) * up``, rotary.

Eager PyTorch runs HF's RMSNorm as five passes over the activations, SwiGLU's activation as two and the rotary
embedding as six; on CPU those passes cost more than the attention (a 4-layer, hidden-256 Llama: 1.6 of 5.7
CPU-seconds of an encode). The ops in ``csrc/cpu/fused_ops.cpp`` make each one pass, with ATen's vector math
(``silu_mul`` and ``rotary`` equal the eager results bit for bit; ``rms_norm`` differs from HF's only in the order
of its sum of squares).

They are compiled on first use with torch's JIT extension builder (a C++ compiler and ninja; ~16 s once, then
cached under ``TORCH_EXTENSIONS_DIR``) for the vector instructions torch itself dispatches to on this CPU.
``LLM2VEC_FAST_CPU_FUSED=0`` turns them off. Where they cannot be built, :func:`unavailable_reason` says why and
callers keep the eager ops (:mod:`llm2vec_fast.hf.fused_cpu` does).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

ENV_SWITCH = "LLM2VEC_FAST_CPU_FUSED"
SOURCE_PACKAGE, SOURCE_NAME = "llm2vec_fast._cpu_source", "fused_ops.cpp"  # csrc/cpu/, mapped in setup.py
_ISA_FLAGS = {
    # torch.backends.cpu.get_cpu_capability() -> compiler flags; at::vec picks its implementation from CPU_CAPABILITY.
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2"],
}

_logger = logging.getLogger(__name__)
_lock = threading.Lock()
_state: dict[str, str | None] = {}  # "reason": None once loaded, else why not (absent: not tried yet)


def _isa() -> str:
    """The vector instruction set torch's own kernels use here: AVX512, AVX2 or DEFAULT (at::vec's scalar code)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return next((isa for isa in _ISA_FLAGS if capability.startswith(isa)), "DEFAULT")


def _build_flags(isa: str) -> list[str]:
    """-O3 without fused multiply-adds (results rounded as eager rounds them), the instruction set's flags, and
    OpenMP where torch threads with it: at::parallel_for is inline and splits work only where the extension itself
    is compiled with OpenMP (it then shares torch's libgomp)."""
    flags = ["-O3", "-ffp-contract=off"]
    if isa in _ISA_FLAGS:
        flags += [*_ISA_FLAGS[isa], f"-DCPU_CAPABILITY_{isa}"]
    if torch._C.has_openmp:
        flags.append("-fopenmp")
    return flags


def _build() -> None:
    """Compile (or load the cached build of) the extension for this torch and instruction set; raises on failure."""
    try:
        import ninja  # the pip package ships the binary; its directory is not on PATH in an unactivated venv

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
    except ImportError:
        pass
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH")
    isa = _isa()
    flags = _build_flags(isa)
    torch_logger = logging.getLogger("torch.utils.cpp_extension")  # its compiler-check banner; our reason says it
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)
    try:
        with resources.as_file(resources.files(SOURCE_PACKAGE) / SOURCE_NAME) as source:
            _load(source, isa, flags)
    finally:
        torch_logger.setLevel(level)


def _load(source: Path, isa: str, flags: list[str]) -> None:
    """torch's JIT build, named per torch version and instruction set (builds for other ones never collide)."""
    from torch.utils import cpp_extension

    version = torch.__version__.split("+")[0].replace(".", "_")
    cpp_extension.load(
        name=f"llm2vec_fast_cpu_fused_torch{version}_{isa.lower()}",
        sources=[str(source)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
        is_python_module=False,
        verbose=False,
    )


def unavailable_reason() -> str | None:
    """None when the fused ops are loaded (building them on the first call), else why they are not."""
    if "reason" in _state:
        return _state["reason"]
    with _lock:
        if "reason" not in _state:
            if os.environ.get(ENV_SWITCH, "").strip() == "0":
                reason = f"{ENV_SWITCH}=0"
            else:
                _logger.info("building the fused CPU ops (once per torch version; cached)")
                try:
                    _build()
                    reason = None
                except Exception as error:  # a missing compiler or ninja, a failed compile: eager ops instead
                    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                    reason = f"the fused CPU ops could not be built ({first_line})"
                    _logger.info("%s; eager ops are used instead", reason)
            _state["reason"] = reason
    return _state["reason"]


def available() -> bool:
    """Whether the fused ops are loaded (building them on the first call)."""
    return unavailable_reason() is None


def _require() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``weight * (x * rsqrt(mean(x**2, -1) + eps))`` of float32 CPU tensors (HF's Llama RMSNorm), one pass."""
    _require()
    return torch.ops.llm2vec_fast_cpu.rms_norm(x, weight, float(eps))


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """``F.silu(gate) * up`` of float32 CPU tensors of one shape, bit for bit, in one pass."""
    _require()
    return torch.ops.llm2vec_fast_cpu.silu_mul(gate, up)


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` of a float32 CPU (B, H, S, D) tensor (last stride 1) and (B or 1, S, D)
    angles, bit for bit as HF's ``apply_rotary_pos_emb`` computes it, in one pass; the result has x's strides."""
    _require()
    return torch.ops.llm2vec_fast_cpu.rotary(x, cos, sin)
