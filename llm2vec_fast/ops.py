"""The attention forward and backward as `torch.library` custom ops.

Registering them (with fake implementations and an autograd formula) makes the attention one
opaque node that autograd differentiates and `torch.compile(fullgraph=True)` traces without a
graph break. Inputs arrive validated (see `functional`); the ops unpack their flat arguments once
into an `AttentionLayout` and `AttentionOptions` and route to a backend.
The log-sum-exp output is differentiable: its gradient enters the backward through delta.

Each op spells out its flat argument list: torch.library infers the schema from the annotations,
so the two schemas (and ``AttentionOptions.from_schema``) repeat those lines by necessity.
"""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from . import key_masks
from .attention_options import AttentionLayout, AttentionOptions
from .backends import get_backend
from .validation import check_cu_seqlens_values


def _check_offsets(q: Tensor, k: Tensor, layout: AttentionLayout) -> None:
    """Self-attention passes one offsets tensor twice: it is checked once (a host sync on GPU where the
    check is not cached, e.g. for inference tensors)."""
    if layout.is_packed:
        check_cu_seqlens_values("cu_seqlens_q", layout.cu_seqlens_q, q.shape[0], layout.max_seqlen_q)
        if layout.cu_seqlens_k is not layout.cu_seqlens_q or (k.shape[0], layout.max_seqlen_k) != (
            q.shape[0],
            layout.max_seqlen_q,
        ):
            check_cu_seqlens_values("cu_seqlens_k", layout.cu_seqlens_k, k.shape[0], layout.max_seqlen_k)


def _layout(backend: ModuleType, key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> AttentionLayout:
    """The layout with the key mask in the form `backend` reads (derived once per mask, see `key_masks`)."""
    state = key_masks.derive(key_mask, backend.KEY_MASK_FORM)
    return AttentionLayout(key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, state)


@torch.library.custom_op("llm2vec_fast::attention_forward", mutates_args=())
def attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    softmax_scale: float,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """Returns (out, lse): out like q (contiguous); lse float32, (B, Hq, Sq) or (Hq, Tq) for varlen."""
    module = get_backend(backend)
    layout = _layout(module, key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    _check_offsets(q, k, layout)
    options = AttentionOptions.from_schema(causal, window_left, window_right, softcap, softmax_scale, deterministic)
    return module.forward(q, k, v, layout, options)


@attention_forward.register_fake
def _attention_forward_fake(q, k, v, key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *options):
    layout = AttentionLayout(key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return q.new_empty(q.shape), q.new_empty(layout.lse_shape(q), dtype=torch.float32)


@torch.library.custom_op("llm2vec_fast::attention_backward", mutates_args=())
def attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dlse: Optional[Tensor],
    key_mask: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor],
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    window_left: int,
    window_right: int,
    softcap: float,
    softmax_scale: float,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv), contiguous, shaped like q, k, v."""
    module = get_backend(backend)
    layout = _layout(module, key_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    options = AttentionOptions.from_schema(causal, window_left, window_right, softcap, softmax_scale, deterministic)
    return module.backward(dout, q, k, v, out, lse, dlse, layout, options)


@attention_backward.register_fake
def _attention_backward_fake(dout, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, key_mask, cu_seqlens_q, cu_seqlens_k, *params = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask, cu_seqlens_q, cu_seqlens_k)
    ctx.params = params
    ctx.set_materialize_grads(False)


def _backward(ctx, dout: Tensor | None, dlse: Tensor | None):
    q, k, v, out, lse, key_mask, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    if dout is None:  # only lse was used: a zero-stride zero gradient costs no memory (backends read strides)
        dout = out.new_zeros(()).expand(out.shape)
    dq, dk, dv = attention_backward(dout, q, k, v, out, lse, dlse, key_mask, cu_seqlens_q, cu_seqlens_k, *ctx.params)
    return (dq, dk, dv) + (None,) * (len(ctx.params) + 3)


attention_forward.register_autograd(_backward, setup_context=_setup_context)
