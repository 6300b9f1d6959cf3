"""Every tensor argument with the strides callers really pass, and the per-tensor caches.

Gradients reach the backward with whatever layout autograd hands over: ``out.sum()`` gives an
expanded, all-zero-stride ``dout`` (the most common case), ``lse.sum()`` a zero-stride ``dlse``,
``torch.autograd.grad(out, ..., dout[..., ::2])`` a last stride of 2. Masks and offsets arrive as
views (``mask.t()``, ``mask[:, ::2]``, a column of a (B+1, 2) tensor). Each case is checked against
the float64 oracle with outputs NaN-poisoned, on the Triton kernels and the reference backend; the
deterministic backward must also be bitwise reproducible (a kernel reading past a zero-stride
buffer reads different garbage every call).
"""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch
from attention_cases import check, padded_case, varlen_case
from oracle import assert_close, attention_oracle, varlen_oracle
from torch import Tensor

import llm2vec_fast.backends.cuda as cuda_backend
import llm2vec_fast.ops  # noqa: F401  (registers torch.ops.llm2vec_fast)
import llm2vec_fast.validation as validation
from llm2vec_fast import flash_attn_func, flash_attn_varlen_func, pad_input, unpad_input
from llm2vec_fast.attention_options import AttentionLayout, AttentionOptions
from llm2vec_fast.kernels.launch import unit_last_stride
from llm2vec_fast.tensor_cache import TensorCache

pytestmark = pytest.mark.usefixtures("poisoned_outputs")
BACKENDS = ("triton", "cpu", "reference")


def strided(values: Tensor, layout: str) -> Tensor:
    """A view with `layout`'s strides holding values equal to `values` (made constant where broadcast)."""
    shape = values.shape
    if layout == "contiguous":
        return values.clone()
    if layout == "scalar":  # out.sum().backward(): every stride 0
        return values.flatten()[:1].reshape([1] * values.dim()).expand(shape)
    if layout == "last_dim_broadcast":  # stride 0 in the last dim only
        return values[..., :1].clone().expand(shape)
    if layout == "leading_broadcast":  # stride 0 in every dim but the last
        return values[(0,) * (values.dim() - 1)].clone().expand(shape)
    if layout == "every_other":  # last stride 2
        wide = torch.empty(*shape[:-1], 2 * shape[-1], dtype=values.dtype, device=values.device).normal_()
        wide[..., ::2] = values
        return wide[..., ::2]
    if layout == "transposed":  # first two dims swapped in memory
        return values.transpose(0, 1).contiguous().transpose(0, 1)
    raise ValueError(f"unknown layout {layout!r}")


GRAD_LAYOUTS = ("scalar", "last_dim_broadcast", "leading_broadcast", "every_other", "transposed")


def on(device, tensor: Tensor | None) -> Tensor | None:
    """`tensor` on `device`, keeping its strides (Tensor.to makes expanded tensors dense)."""
    if tensor is None or tensor.device == torch.device(device):
        return tensor
    return torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device=device).copy_(tensor)


def run_with_grads(
    case, backend: str, dout: Tensor | None, dlse: Tensor | None, deterministic: bool = False, device="cpu"
):
    """(out, lse, dq, dk, dv) backpropagating the given (strided) dout and dlse as they are (None: that
    output takes no part in the loss), every input on `device` with its strides."""
    q, k, v = (on(device, t).clone().requires_grad_() for t in (case.q, case.k, case.v))
    dout, dlse = on(device, dout), on(device, dlse)
    options = dict(
        causal=case.causal, softmax_scale=case.scale, return_lse=True, deterministic=deterministic, backend=backend
    )
    if case.cu_seqlens_q is None:
        out, lse = flash_attn_func(q, k, v, on(device, case.key_mask), **options)
    else:
        out, lse = flash_attn_varlen_func(
            q, k, v, on(device, case.cu_seqlens_q), on(device, case.cu_seqlens_k), *case.max_seqlens, **options
        )
    pairs = [(output, grad) for output, grad in ((out, dout), (lse, dlse)) if grad is not None]
    outputs, grads_in = zip(*pairs)
    return (out.detach(), lse.detach(), *torch.autograd.grad(outputs, (q, k, v), grads_in))


def check_gradient_layout(case, backend: str, dout_layout: str, dlse_layout: str | None, device="cpu") -> None:
    dout = strided(case.dout, dout_layout)
    case.dout = dout.contiguous()
    dlse = None
    if dlse_layout is not None:
        dlse = strided(case.dlse, dlse_layout)
        case.dlse = dlse.contiguous()
    got = run_with_grads(case, backend, dout, dlse, deterministic=True, device=device)
    check(case, got, with_dlse=dlse is not None)
    again = run_with_grads(case, backend, dout, dlse, deterministic=True, device=device)
    for name, first, second in zip(("dq", "dk", "dv"), got[2:], again[2:]):
        assert torch.equal(first, second), f"{name}: deterministic backward differs between two calls"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
def test_dout_layouts_padded(backend, layout):
    case = padded_case(2, 40, 40, 4, 2, 16, torch.float32, "holes")
    check_gradient_layout(case, backend, layout, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
def test_dout_layouts_varlen(backend, layout):
    case = varlen_case([7, 0, 33], [7, 0, 33], 2, 1, 16, torch.float32)
    check_gradient_layout(case, backend, layout, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dlse_layout", ["scalar", "every_other", "transposed"])
def test_dlse_layouts(backend, dlse_layout):
    """(out * w).sum() + lse.sum(): a dense dout next to a zero-stride dlse, and other dlse layouts."""
    case = padded_case(2, 37, 37, 2, 1, 16, torch.float32, "left")
    check_gradient_layout(case, backend, "contiguous", dlse_layout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dlse_layouts_varlen(backend):
    case = varlen_case([5, 30], [5, 30], 2, 2, 16, torch.float32)
    check_gradient_layout(case, backend, "scalar", "scalar")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
def test_gpu_gradient_layouts(backend, layout):
    """The GPU backends at a real head dim in bf16: the CUDA binding copies what its kernels cannot read."""
    case = padded_case(2, 300, 300, 4, 2, 64, torch.bfloat16, "holes")
    case.key_mask = mask_views(2, 300)["transposed"]
    check_gradient_layout(case, backend, layout, "scalar", device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cu_seqlens_views(backend):
    case = varlen_case([9, 0, 310, 2], [9, 0, 310, 2], 4, 1, 128, torch.bfloat16)
    for name in ("cu_seqlens_q", "cu_seqlens_k"):
        setattr(case, name, torch.stack([getattr(case, name)] * 2, dim=1)[:, 0])
    check(case, run_with_grads(case, backend, case.dout, case.dlse, device="cuda"), with_dlse=True)


@pytest.mark.parametrize("layout", GRAD_LAYOUTS)
def test_unit_last_stride_copies_only_what_broadcasting_does_not_repeat(layout):
    """The all-zero-stride dout of out.sum() becomes one head-dim row (D elements), not B*S*H*D."""
    values = torch.randn(2, 5, 3, 16)
    view = strided(values, layout)
    ready = unit_last_stride(view)
    assert ready.stride(-1) == 1 and torch.equal(ready, view)
    zero_dims = [dim for dim, stride in enumerate(view.stride()[:-1]) if stride == 0]
    assert all(ready.stride(dim) == 0 for dim in zero_dims)
    if layout == "scalar":
        assert ready.untyped_storage().nbytes() == 16 * values.element_size()


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_on_lse_alone(backend):
    """Autograd passes no dout at all: the op supplies a zero-stride zero gradient."""
    case = padded_case(2, 30, 30, 2, 1, 16, torch.float32, "empty_row")
    case.dout = torch.zeros_like(case.dout)
    got = run_with_grads(case, backend, None, case.dlse)
    for name, grad, ref in zip(("dq", "dk", "dv"), got[2:], case.oracle(with_dlse=True)[2:]):
        assert_close(grad, ref, torch.float32, name)


def test_sum_backward_through_public_api(kernel_device):
    """The issue's reproduction: flash_attn_func(...).sum().backward() on the Triton kernels."""
    q, k, v = (torch.randn(2, 33, 2, 16, device=kernel_device, requires_grad=True) for _ in range(3))
    flash_attn_func(q, k, v, backend="triton").sum().backward()
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    attention_oracle(*leaves)[0].sum().backward()
    for name, tensor, leaf in zip(("dq", "dk", "dv"), (q, k, v), leaves):
        assert_close(tensor.grad.cpu(), leaf.grad, torch.float32, name)


# ----- masks and offsets as views


def mask_views(batch: int, seqlen: int) -> dict[str, Tensor]:
    """(batch, seqlen) key-padding masks whose last stride is not 1, with holes and left padding."""
    by_key = torch.ones(seqlen, batch, dtype=torch.bool)
    by_key[:7, 0] = False
    by_key[20:30, 1] = False
    wide = torch.ones(batch, 2 * seqlen, dtype=torch.bool)
    wide[0, 1::2] = False  # the odd columns are dropped by the view: a stride-blind read sees holes
    wide[1, 10:40] = False
    int_view = torch.ones(batch, 3 * seqlen, dtype=torch.int32)
    int_view[1, :45] = 0
    return {"transposed": by_key.t(), "every_other": wide[:, ::2], "int_every_third": int_view[:, ::3]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["transposed", "every_other", "int_every_third"])
def test_mask_views(backend, view):
    case = padded_case(2, 40, 40, 2, 1, 16, torch.float32, "none")
    case.key_mask = mask_views(2, 40)[view]
    assert case.key_mask.stride(-1) != 1
    check(case, run_with_grads(case, backend, case.dout, case.dlse), with_dlse=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cu_seqlens_views(backend):
    case = varlen_case([9, 0, 31, 2], [9, 0, 31, 2], 2, 1, 16, torch.float32)
    for name in ("cu_seqlens_q", "cu_seqlens_k"):
        offsets = getattr(case, name)
        holder = torch.stack([offsets, torch.full_like(offsets, 1000)], dim=1)  # the offsets are column 0
        setattr(case, name, holder[:, 0])
    assert case.cu_seqlens_q.stride(0) == 2
    check(case, run_with_grads(case, backend, case.dout, case.dlse), with_dlse=True)


# ----- the custom ops called directly, with strided inputs the public functions would copy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("varlen", [False, True])
def test_custom_ops_take_any_strides(backend, varlen):
    """q/k/v with a last stride of 2, and out/lse/dout/dlse views, straight into torch.ops.llm2vec_fast."""
    case = (
        varlen_case([6, 25], [6, 25], 2, 1, 16, torch.float32)
        if varlen
        else padded_case(2, 31, 31, 2, 1, 16, torch.float32, "holes")
    )
    q, k, v = (strided(t, "every_other") for t in (case.q, case.k, case.v))
    max_q, max_k = case.max_seqlens if varlen else (q.shape[1], k.shape[1])
    args = (
        case.key_mask,
        case.cu_seqlens_q,
        case.cu_seqlens_k,
        max_q,
        max_k,
        False,
        -1,
        -1,
        0.0,
        case.scale,
        True,
        backend,
    )
    out, lse = torch.ops.llm2vec_fast.attention_forward(q, k, v, *args)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = case.oracle(with_dlse=True)
    assert_close(out, ref_out, torch.float32, "out")
    grads = torch.ops.llm2vec_fast.attention_backward(
        strided(case.dout, "every_other"),
        q,
        k,
        v,
        strided(out, "transposed"),
        strided(lse, "every_other"),
        strided(case.dlse, "transposed"),
        *args,
    )
    for name, grad, ref in zip(("dq", "dk", "dv"), grads, (ref_dq, ref_dk, ref_dv)):
        assert_close(grad, ref, torch.float32, name)


def test_cuda_backend_hands_the_binding_contiguous_offsets(monkeypatch):
    """The binding refuses cu_seqlens views (TORCH_CHECK); its Python side copies them (16 bytes or so)."""
    seen = {}

    def record(name):
        def op(*args):
            seen[name] = args

        return op

    monkeypatch.setattr(
        torch.ops, "llm2vec_fast_cuda", SimpleNamespace(fwd=record("fwd"), bwd=record("bwd")), raising=False
    )
    case = varlen_case([3, 5], [3, 5], 2, 1, 64, torch.float16)
    offsets = torch.stack([case.cu_seqlens_q, case.cu_seqlens_q], dim=1)[:, 0]
    layout, options = AttentionLayout(None, offsets, offsets, 5, 5), AttentionOptions(softmax_scale=0.125)
    cuda_backend.forward(case.q, case.k, case.v, layout, options)
    cuda_backend.backward(case.q, case.q, case.k, case.v, case.q, case.dlse, None, layout, options)
    for name, position in (("fwd", 4), ("bwd", 8)):
        for cu in seen[name][position : position + 2]:
            assert cu.is_contiguous() and torch.equal(cu, case.cu_seqlens_q), name


def test_unpad_and_pad_take_views():
    hidden = torch.randn(6, 3, 5).transpose(0, 1)  # (B, S, D) with S outermost in memory
    rows = [[1, 1, 0, 0, 1, 0], [0, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]
    mask = torch.tensor(rows, dtype=torch.bool).t().contiguous().t()  # last stride 3
    packed, indices, cu_seqlens, max_seqlen = unpad_input(hidden, mask)
    expected = unpad_input(hidden.contiguous(), mask.contiguous())
    for got, want in zip((packed, indices, cu_seqlens), expected[:3]):
        assert torch.equal(got, want)
    assert max_seqlen == expected[3]
    padded = pad_input(strided(packed, "every_other"), indices, 3, 6)
    assert torch.equal(padded, hidden * mask[..., None])


# ----- caches keyed by tensor identity


def test_mask_filled_in_place_under_inference_mode():
    """Inference tensors keep no version counter: a cache cannot see the edit, so it must not answer."""
    q, k, v = (torch.randn(2, 100, 2, 16) for _ in range(3))
    with torch.inference_mode():
        mask = torch.ones(2, 100, dtype=torch.bool)
        mask[0, 40:70] = False  # a 30-key hole
        mask[1, :80] = False  # a gap long enough to skip as its own span
        flash_attn_func(q, k, v, mask, backend="triton")
        mask[0, 40:70] = True
        mask[1, :80] = True
        out = flash_attn_func(q, k, v, mask, backend="triton")
    ref, _ = attention_oracle(q, k, v, key_mask=mask.clone())
    assert_close(out, ref, torch.float32, "out")


def test_offsets_edited_in_place_under_inference_mode():
    q, k, v = (torch.randn(9, 2, 16) for _ in range(3))
    with torch.inference_mode():
        cu = torch.tensor([0, 4, 9], dtype=torch.int32)
        flash_attn_varlen_func(q, k, v, cu, cu, 5, 5)
        cu[1] = 6  # now 0..6 and 6..9: lengths 6 and 3, the first longer than max_seqlen 5
        with pytest.raises(ValueError, match="longer than max_seqlen"):
            flash_attn_varlen_func(q, k, v, cu, cu, 5, 5)


def test_offsets_fixed_in_place_under_inference_mode_are_used():
    q, k, v = (torch.randn(9, 2, 16) for _ in range(3))
    with torch.inference_mode():
        cu = torch.tensor([0, 4, 9], dtype=torch.int32)
        flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, backend="triton")
        cu[1] = 5
        out = flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, backend="triton")
    ref, _ = varlen_oracle(q, k, v, cu.clone(), cu.clone())
    assert_close(out, ref, torch.float32, "out")


def test_self_attention_offsets_are_read_once_per_call(monkeypatch):
    """Uncached (inference) offsets cost a host sync per check: one tensor passed as q and k offsets is read once."""
    reads = []
    check = validation._check_offsets
    monkeypatch.setattr(validation, "_check_offsets", lambda name, *args: reads.append(name) or check(name, *args))
    q, k, v = (torch.randn(9, 2, 16) for _ in range(3))
    with torch.inference_mode():
        cu = torch.tensor([0, 4, 9], dtype=torch.int32)
        flash_attn_varlen_func(q, k, v, cu, cu, 5, 5)
        assert reads == ["cu_seqlens_q"]
        flash_attn_varlen_func(q, k, v, cu, cu.clone(), 5, 5)
        assert reads == ["cu_seqlens_q", "cu_seqlens_q", "cu_seqlens_k"]


def test_cache_never_answers_for_a_dead_tensor_whose_id_is_reused():
    cache = TensorCache()
    calls = []

    def compute(tensor):
        calls.append(tensor.sum().item())
        return calls[-1]

    reused = False
    for attempt in range(200):
        first = torch.full((4,), attempt, dtype=torch.int32)
        old_id = id(first)
        assert cache.get(first, None, lambda tensor=first: compute(tensor)) == 4 * attempt
        del first
        gc.collect()
        second = torch.full((4,), attempt + 1000, dtype=torch.int32)
        assert cache.get(second, None, lambda tensor=second: compute(tensor)) == 4 * (attempt + 1000)
        reused = id(second) == old_id
        del second
        if reused:
            break  # the case is exercised; each further gc.collect() costs ~0.5 s in a full test process
    assert reused, "the interpreter never reused an id: the test did not exercise the case"


def test_cache_sees_data_swapped_under_the_same_tensor():
    """`tensor.data = other` keeps the Python object (and, for some versions, the version counter)."""
    cache = TensorCache()
    tensor = torch.zeros(3)
    assert cache.get(tensor, None, lambda: tensor.sum().item()) == 0
    tensor.data = torch.ones(5)
    assert cache.get(tensor, None, lambda: tensor.sum().item()) == 5


def test_backend_must_be_a_string():
    q = torch.randn(1, 4, 2, 16)
    with pytest.raises(TypeError, match="backend"):
        flash_attn_func(q, q, q, backend=3)
    with pytest.raises(TypeError, match="backend"):
        flash_attn_varlen_func(
            q[0],
            q[0],
            q[0],
            torch.tensor([0, 4], dtype=torch.int32),
            torch.tensor([0, 4], dtype=torch.int32),
            4,
            4,
            backend=["triton"],
        )
