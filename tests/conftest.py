"""Test configuration: Triton runs in its CPU interpreter unless a CUDA device is present.

TRITON_INTERPRET must be set before any module defining a @triton.jit function is imported,
hence at the very top of this file.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
torch.set_num_threads(1)  # tiny tensors everywhere; with one xdist worker per core, threads only contend

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def kernel_device() -> torch.device:
    """Where Triton kernels run: the GPU when there is one, else the interpreter on CPU tensors."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Make every torch.empty/empty_like during the test return NaN-filled (or -7-filled) memory,
    so an element a kernel forgets to write shows up instead of passing by luck."""
    original_empty, original_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        if tensor.dtype.is_floating_point:
            return tensor.fill_(float("nan"))
        return tensor.fill_(True if tensor.dtype == torch.bool else -7)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(original_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(original_empty_like(*a, **k)))
