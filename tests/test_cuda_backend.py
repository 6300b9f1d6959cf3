"""The CUDA backend (``backend="cuda"``, the extension llm2vec_fast._cuda) through the public API.

CPU tests: the dispatch rules (a forced backend that is not built says so; "auto" never picks
CUDA for CPU tensors; unsupported inputs are named). GPU tests (marked ``gpu``, they need the
extension built with ``pip install --no-build-isolation .``): forward, lse and all gradients
against the float64 oracle and against the Triton backend at real sizes, on every padding
pattern, length, GQA ratio, head dim, dtype, varlen, window and soft cap; outputs poisoned with
NaN inside the binding before the kernels run; a bitwise deterministic backward; torch.compile
and opcheck; compute-sanitizer memcheck, racecheck and synccheck on small shapes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from attention_cases import MASK_KINDS, Case, check, padded_case, run_public_api, varlen_case
from oracle import TOLERANCE, relative_error

import llm2vec_fast.backends as backends
import llm2vec_fast.backends.cuda as cuda_backend
from llm2vec_fast import flash_attn_func, resolve_backend
from llm2vec_fast.attention_options import AttentionOptions

ROOT = Path(__file__).resolve().parent.parent


# ---- dispatch (CPU) ---------------------------------------------------------------------------


def test_forcing_cuda_without_the_extension_says_it_is_not_built():
    q = torch.randn(1, 8, 2, 64, dtype=torch.float16)
    with pytest.raises((RuntimeError, ValueError)) as error:
        flash_attn_func(q, q, q, backend="cuda")
    if cuda_backend._extension_error() is not None:
        assert "llm2vec_fast._cuda is not built" in str(error.value)
        assert "pip install --no-build-isolation" in str(error.value)
    else:  # built (GPU machine): CPU tensors are refused with the reason
        assert "CUDA tensors" in str(error.value)


def test_auto_never_picks_cuda_for_cpu_tensors(monkeypatch):
    """Not even when the CUDA backend reports itself available and willing."""
    willing = SimpleNamespace(unavailable_reason=lambda: None, unsupported_reason=lambda *args: None)
    monkeypatch.setitem(backends._loaded, "cuda", willing)
    monkeypatch.delenv(backends.BACKEND_ENV_VAR, raising=False)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q = torch.randn(1, 8, 2, 64, dtype=dtype)
        assert resolve_backend(q, q) == "cpu"


@pytest.mark.parametrize(
    "dtype,head_dim,expected",
    [
        (torch.float32, 64, "float16 and bfloat16"),
        (torch.float16, 96, "head dims 64 and 128"),
        (torch.bfloat16, 128, "CUDA tensors"),
    ],
)
def test_unsupported_inputs_are_named(dtype, head_dim, expected):
    q = torch.randn(1, 4, 2, head_dim, dtype=dtype)
    assert expected in cuda_backend.unsupported_reason(q, q, AttentionOptions())


# ---- the kernels (GPU) --------------------------------------------------------------------------


@pytest.fixture
def cuda_kernels(monkeypatch):
    """The built extension, its outputs NaN-poisoned before every kernel launch."""
    reason = cuda_backend.unavailable_reason()
    assert reason is None, f"the CUDA backend must be available on a GPU machine: {reason}"
    monkeypatch.setenv("LLM2VEC_FAST_CUDA_POISON_OUTPUTS", "1")
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))


def run(case: Case, backend: str = "cuda", deterministic: bool = False, with_dlse: bool = False):
    return run_public_api(case, backend, "cuda", deterministic, with_dlse)


def check_gpu(case: Case, deterministic: bool = False, with_dlse: bool = False, against_triton: bool = True):
    got = run(case, "cuda", deterministic, with_dlse)
    check(case, got, with_dlse, device="cuda")
    if against_triton:
        triton = run(case, "triton", deterministic, with_dlse)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, triton):
            finite = torch.isfinite(b)
            error = relative_error(a[finite], b[finite])
            assert error < 2 * TOLERANCE[case.q.dtype], f"{name}: cuda vs triton relative difference {error:.2e}"


@pytest.mark.gpu
def test_auto_prefers_cuda_where_it_applies(cuda_kernels, monkeypatch):
    monkeypatch.delenv(backends.BACKEND_ENV_VAR, raising=False)
    for head_dim, dtype, expected in (
        (128, torch.bfloat16, "cuda"),
        (64, torch.float16, "cuda"),
        (96, torch.bfloat16, "triton"),
        (64, torch.float32, "triton"),
    ):
        q = torch.randn(1, 8, 2, head_dim, device="cuda", dtype=dtype)
        assert resolve_backend(q, q) == expected, (head_dim, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen", [1, 17, 64, 129, 300, 1024])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lengths_and_padding(cuda_kernels, seqlen, mask_kind, causal, dtype):
    check_gpu(padded_case(3, seqlen, seqlen, 8, 2, 128, dtype, mask_kind, causal=causal), deterministic=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("heads_q,heads_kv", [(8, 8), (8, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gqa_ratios_and_head_dims(cuda_kernels, heads_q, heads_kv, head_dim, deterministic):
    check_gpu(padded_case(2, 513, 513, heads_q, heads_kv, head_dim, torch.bfloat16, "holes"), deterministic)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_varlen_uneven_lengths(cuda_kernels, causal, head_dim, dtype):
    lengths = [1, 0, 17, 1024, 129, 300, 64]
    check_gpu(varlen_case(lengths, lengths, 8, 2, head_dim, dtype, causal=causal), deterministic=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_cross_lengths(cuda_kernels, causal):
    check_gpu(varlen_case([5, 700, 33, 8], [400, 3, 33, 0], 4, 1, 128, torch.bfloat16, causal=causal))


@pytest.mark.gpu
@pytest.mark.parametrize("seqlen_q,seqlen_k", [(100, 1000), (1000, 100)])
@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_with_key_mask(cuda_kernels, seqlen_q, seqlen_k, causal):
    check_gpu(padded_case(2, seqlen_q, seqlen_k, 4, 4, 64, torch.float16, "holes", causal=causal))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "window_size,softcap", [((128, 0), 0.0), ((64, 64), 0.0), ((-1, 16), 0.0), ((-1, -1), 30.0), ((200, 5), 10.0)]
)
def test_window_and_softcap(cuda_kernels, window_size, softcap):
    case = padded_case(2, 700, 700, 8, 2, 128, torch.bfloat16, "left", window_size=window_size, softcap=softcap)
    check_gpu(case)
    check_gpu(case, deterministic=True, against_triton=False)


@pytest.mark.gpu
def test_lse_gradient(cuda_kernels):
    check_gpu(padded_case(2, 300, 300, 4, 2, 64, torch.float16, "empty_row"), with_dlse=True)
    check_gpu(varlen_case([30, 0, 500], [30, 0, 500], 4, 4, 128, torch.bfloat16), deterministic=True, with_dlse=True)


@pytest.mark.gpu
def test_strided_inputs(cuda_kernels):
    batch, seqlen, heads, head_dim = 2, 333, 4, 128
    q = torch.randn(batch, heads, seqlen, head_dim).to(torch.bfloat16).transpose(1, 2)
    kv = torch.randn(batch, seqlen, 2, 2, head_dim).to(torch.bfloat16)
    mask = padded_case(batch, 1, seqlen, 1, 1, 64, torch.float16, "right").key_mask
    check_gpu(Case(q, kv[:, :, 0], kv[:, :, 1], mask, causal=True))


@pytest.mark.gpu
@pytest.mark.parametrize("case_kind", ["padded", "varlen"])
def test_deterministic_backward_is_bitwise_reproducible(cuda_kernels, case_kind):
    if case_kind == "padded":
        case = padded_case(4, 1024, 1024, 16, 2, 128, torch.bfloat16, "holes")
    else:
        case = varlen_case([1024, 77, 513, 1], [1024, 77, 513, 1], 16, 2, 64, torch.float16)
    first, second = run(case, deterministic=True), run(case, deterministic=True)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two deterministic runs"


@pytest.mark.gpu
def test_ops_trace_and_pass_opcheck(cuda_kernels):
    case = padded_case(2, 100, 100, 4, 2, 64, torch.float16, "holes")
    q, k, v = (t.cuda() for t in (case.q, case.k, case.v))
    mask = case.key_mask.cuda()
    compiled = torch.compile(lambda q, k, v, m: flash_attn_func(q, k, v, m, backend="cuda"), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), flash_attn_func(q, k, v, mask, backend="cuda"))
    forward_args = (q, k, v, mask, None, None, 100, 100, False, -1, -1, 0.0, case.scale)
    torch.library.opcheck(torch.ops.llm2vec_fast_cuda.fwd.default, forward_args)
    out, lse = torch.ops.llm2vec_fast_cuda.fwd(*forward_args)
    backward_args = (
        case.dout.cuda(),
        q,
        k,
        v,
        out,
        lse,
        None,
        mask,
        None,
        None,
        100,
        100,
        False,
        -1,
        -1,
        0.0,
        case.scale,
        True,
    )
    torch.library.opcheck(torch.ops.llm2vec_fast_cuda.bwd.default, backward_args)


@pytest.mark.gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_is_clean(cuda_kernels, tool):
    sanitizer = shutil.which("compute-sanitizer")
    assert sanitizer is not None, "compute-sanitizer is not on PATH on this GPU machine"
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # one allocation per tensor: exact bounds
    command = [
        sanitizer,
        "--tool",
        tool,
        "--error-exitcode",
        "99",
        sys.executable,
        str(ROOT / "benchmarks" / "sanitize_cuda.py"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, f"compute-sanitizer --tool {tool}:\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert "all kernel variants ran" in result.stdout
