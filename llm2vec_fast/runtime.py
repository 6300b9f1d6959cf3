"""Checks that a requested device and attention backend exist on this machine, before any model loads.

Shared by the commands (``encode``, ``train``) and the encoder so that a missing GPU or an unusable
backend is one ``ValueError`` naming the problem, not an assertion deep inside torch or a kernel.
"""

from __future__ import annotations

import torch

from .attention_options import AttentionOptions
from .backends import check_backend_name, get_backend


def default_device() -> torch.device:
    """CUDA when a CUDA device is visible, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: str | torch.device | None) -> torch.device:
    """The device `device` names (None: :func:`default_device`), raising ValueError if it cannot be used here."""
    if device is None:
        return default_device()
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"invalid device {device!r}: expected e.g. cpu, cuda or cuda:0") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA device is available on this machine")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {device!r} requested but this machine has {count} CUDA device(s)")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} requested but MPS is not available on this machine")
    elif parsed.type not in ("cpu", "cuda", "mps", "meta"):
        raise ValueError(f"unsupported device {device!r}: use cpu or cuda[:N]")
    return parsed


def check_backend(backend: str | None, device: str | torch.device | None) -> None:
    """Raise ValueError if attention `backend` (None or "auto": any) cannot run on `device` on this machine."""
    if backend is None or check_backend_name(backend) == "auto":
        return
    target = check_device(device)
    try:
        module = get_backend(backend)
    except RuntimeError as error:
        raise ValueError(str(error)) from None
    if backend == "cuda" and target.type != "cuda":
        raise ValueError(f"attention backend 'cuda' runs on CUDA devices, not on {target}")
    probe = torch.empty(0, 1, 64, device=target)  # the triton and cpu backends only look at the device here
    reason = module.unsupported_reason(probe, probe, AttentionOptions()) if backend in ("triton", "cpu") else None
    if reason is not None:
        raise ValueError(f"attention backend {backend!r} cannot run on {target}: {reason}")
