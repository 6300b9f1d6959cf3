"""Attention backends and the choice between them.

A backend is a module exposing the contract that `reference` defines:
``NAME``, ``KEY_MASK_FORM`` (what it reads of a key mask, see `key_masks`), ``unavailable_reason()``,
``unsupported_reason(q, k, options)``, ``forward(q, k, v, layout, options)`` and
``backward(dout, q, k, v, out, lse, dlse, layout, options)`` (see `attention_options`). The Triton
backend is the kernels' entry point, ``llm2vec_fast.kernels.backend``.

The choice is, in order: an explicit ``backend=`` argument, the environment variable
``LLM2VEC_FAST_BACKEND``, then "auto" (CUDA extension > Triton on CUDA tensors; torch's fused CPU
attention on CPU tensors where the options allow, see `cpu`; the exact PyTorch reference otherwise).

Every backend spells out the same ``forward``/``backward`` signatures: that repetition is the
contract itself (reported by ``duplicates``), the bodies share nothing.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from torch import Tensor

from ..attention_options import AttentionOptions

BACKEND_ENV_VAR = "LLM2VEC_FAST_BACKEND"
MODULES = {
    "cuda": f"{__name__}.cuda",
    "triton": "llm2vec_fast.kernels.backend",
    "cpu": f"{__name__}.cpu",
    "reference": f"{__name__}.reference",
}
BACKENDS = tuple(MODULES)
_PRIORITY = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
"""What "auto" tries per device type, in order, before the reference."""
DEFAULT_OPTIONS = AttentionOptions()
"""Options of a plain call (non-causal, no window or softcap, default scale): what a probe of a backend assumes."""

_loaded: dict[str, ModuleType | ImportError] = {}


def check_backend_name(name: str) -> str:
    """`name` if it names a backend or "auto", else a ValueError listing the choices."""
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}: choose one of auto, {', '.join(BACKENDS)}")
    return name


def get_backend(name: str) -> ModuleType:
    """The backend module `name`, raising RuntimeError if it cannot be used on this machine."""
    if check_backend_name(name) == "auto":
        raise ValueError("get_backend takes a backend's name; resolve 'auto' with resolve_backend")
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(MODULES[name])
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
    options: AttentionOptions = DEFAULT_OPTIONS,
) -> str:
    """Name of the backend that will run attention on these inputs.

    A forced backend that is missing or cannot take the inputs raises an error saying why;
    "auto" falls through to the next backend instead.
    """
    if requested is not None and not isinstance(requested, str):
        raise TypeError(f"backend must be a string ({', '.join(('auto',) + BACKENDS)}) or None, got {requested!r}")
    name = check_backend_name((requested or os.environ.get(BACKEND_ENV_VAR) or "auto").lower())
    if name != "auto":
        reason = get_backend(name).unsupported_reason(q, k, options)
        if reason is not None:
            raise ValueError(f"attention backend {name!r} cannot run these inputs: {reason}")
        return name
    for candidate in _PRIORITY.get(q.device.type, ()):
        try:
            module = get_backend(candidate)
        except RuntimeError:
            continue
        if module.unsupported_reason(q, k, options) is None:
            return candidate
    return "reference"
