"""Device and backend availability checks (``llm2vec_fast.runtime``): one ValueError naming the problem."""

from __future__ import annotations

import pytest
import torch

from llm2vec_fast.runtime import check_backend, check_device

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


def test_check_device_parses_cpu_and_defaults() -> None:
    assert check_device("cpu") == torch.device("cpu")
    assert check_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_check_device_without_cuda(device) -> None:
    with pytest.raises(ValueError, match="no CUDA device is available"):
        check_device(device)


@pytest.mark.parametrize(("device", "error"), [("gpu0", ValueError), ("", ValueError), (3, TypeError)])
def test_check_device_rejects_malformed(device, error) -> None:
    with pytest.raises(error, match="device"):
        check_device(device)


def test_check_backend_accepts_auto_and_reference() -> None:
    check_backend(None, "cpu")
    check_backend("auto", "cpu")
    check_backend("reference", "cpu")


def test_check_backend_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        check_backend("flash", "cpu")


@no_cuda
def test_check_backend_cuda_without_gpu() -> None:
    with pytest.raises(ValueError, match="attention backend 'cuda'"):
        check_backend("cuda", "cpu")


def test_check_backend_triton_on_cpu_follows_the_interpreter(monkeypatch) -> None:
    from llm2vec_fast.kernels import backend as triton_backend

    monkeypatch.setattr(triton_backend, "INTERPRETING", True)
    check_backend("triton", "cpu")  # the CPU interpreter runs CPU tensors
    monkeypatch.setattr(triton_backend, "INTERPRETING", False)
    with pytest.raises(ValueError, match="attention backend 'triton'"):
        check_backend("triton", "cpu")


def test_check_backend_cpu_runs_on_cpu_only() -> None:
    check_backend("cpu", "cpu")
    with pytest.raises(ValueError, match="attention backend 'cpu' cannot run on meta: it runs on CPU tensors"):
        check_backend("cpu", "meta")
