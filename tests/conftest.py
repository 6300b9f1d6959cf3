"""Test configuration: Triton runs in its CPU interpreter unless a CUDA device is present.

TRITON_INTERPRET must be set before any module defining a @triton.jit function is imported,
hence at the very top of this file.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

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
