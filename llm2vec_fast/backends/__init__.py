"""Attention backends and the choice between them.

A backend is a module exposing the contract that `reference` defines:
``NAME``, ``unavailable_reason()``, ``unsupported_reason(q, k, window_size, softcap)``, ``forward(...)`` and
``backward(...)``. The choice is, in order: an explicit ``backend=`` argument, the environment
variable ``LLM2VEC_FAST_BACKEND``, then "auto" (CUDA extension > Triton on CUDA tensors; the exact
PyTorch reference on any other device).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

from torch import Tensor

BACKEND_ENV_VAR = "LLM2VEC_FAST_BACKEND"
BACKENDS = ("cuda", "triton", "reference")
_GPU_PRIORITY = ("cuda", "triton")

_loaded: dict[str, ModuleType | ImportError] = {}


def get_backend(name: str) -> ModuleType:
    """The backend module `name`, raising RuntimeError if it cannot be used on this machine."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: choose one of auto, {', '.join(BACKENDS)}")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"{__name__}.{name}")
        except ImportError as error:
            _loaded[name] = error
    module = _loaded[name]
    if isinstance(module, ImportError):
        raise RuntimeError(f"attention backend {name!r} is not available: {module}")
    reason = module.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"attention backend {name!r} is not available: {reason}")
    return module


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine (for some inputs)."""
    names = []
    for name in BACKENDS:
        try:
            get_backend(name)
        except RuntimeError:
            continue
        names.append(name)
    return names


def resolve_backend(
    q: Tensor,
    k: Tensor,
    requested: str | None = None,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> str:
    """Name of the backend that will run attention on these inputs.

    A forced backend that is missing or cannot take the inputs raises an error saying why;
    "auto" falls through to the next backend instead.
    """
    if requested is not None and not isinstance(requested, str):
        raise TypeError(f"backend must be a string ({', '.join(('auto',) + BACKENDS)}) or None, got {requested!r}")
    name = (requested or os.environ.get(BACKEND_ENV_VAR) or "auto").lower()
    if name != "auto":
        reason = get_backend(name).unsupported_reason(q, k, window_size, softcap)
        if reason is not None:
            raise ValueError(f"attention backend {name!r} cannot run these inputs: {reason}")
        return name
    if q.device.type == "cuda":
        for candidate in _GPU_PRIORITY:
            try:
                module = get_backend(candidate)
            except RuntimeError:
                continue
            if module.unsupported_reason(q, k, window_size, softcap) is None:
                return candidate
    return "reference"
