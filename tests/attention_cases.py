"""Attention cases shared by the kernel tests: Triton (test_triton_attention.py, interpreter or GPU),
CUDA on the CPU emulator (test_cuda_emulated.py) and on a GPU (test_cuda_backend.py).

A case draws fresh random inputs (and an upstream gradient for out and lse), computes the float64
oracle of tests/oracle.py with autograd, and checks a kernel's (out, lse, dq, dk, dv) against it:
per-dtype relative error, lse = -inf exactly on the rows that see no key, and exact zeros in the
outputs and query gradients of those rows (and in the key gradients of keys no query sees).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from oracle import assert_close, attention_oracle, varlen_oracle
from torch import Tensor

from llm2vec_fast import flash_attn_func, flash_attn_varlen_func

MASK_KINDS = ("none", "right", "left", "holes", "empty_row")


def key_padding_mask(kind: str, batch: int, seqlen: int) -> Tensor | None:
    """(batch, seqlen) bool, True = real token: right/left padding, holes, a fully padded row."""
    if kind == "none":
        return None
    mask = torch.ones(batch, seqlen, dtype=torch.bool)
    cut = max(1, seqlen // 3)
    if kind == "right":
        mask[-1, seqlen - cut :] = False
    elif kind == "left":
        mask[0, :cut] = False
    elif kind == "holes":
        mask[0, 1 : 1 + cut] = False
        mask[-1, ::3] = False
    elif kind == "empty_row":
        mask[-1] = False
        mask[0, seqlen - cut :] = False
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return mask


def offsets(lengths: list[int]) -> Tensor:
    """int32 cu_seqlens for sequences of these lengths."""
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


@dataclass
class Case:
    """Inputs of one attention call (CPU tensors), padded (cu_seqlens None) or varlen."""

    q: Tensor
    k: Tensor
    v: Tensor
    key_mask: Tensor | None = None
    cu_seqlens_q: Tensor | None = None
    cu_seqlens_k: Tensor | None = None
    causal: bool = False
    window_size: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    softmax_scale: float | None = None
    dout: Tensor = field(init=False)
    dlse: Tensor = field(init=False)

    def __post_init__(self):
        self.dout = torch.randn(self.q.shape, dtype=self.q.dtype)
        varlen = self.cu_seqlens_q is not None
        lse_shape = (
            (self.q.shape[1], self.q.shape[0]) if varlen else (self.q.shape[0], self.q.shape[2], self.q.shape[1])
        )
        self.dlse = torch.randn(lse_shape)

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5 if self.softmax_scale is None else self.softmax_scale

    @property
    def max_seqlens(self) -> tuple[int, int]:
        lengths_q = (self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]).max().item()
        lengths_k = (self.cu_seqlens_k[1:] - self.cu_seqlens_k[:-1]).max().item()
        return int(lengths_q), int(lengths_k)

    def oracle(self, with_dlse: bool, device: str | torch.device = "cpu") -> tuple[Tensor, ...]:
        """Float64 (out, lse, dq, dk, dv) on CPU, computed on `device`; the loss is <out, dout>
        (+ <lse, dlse> on finite lse)."""
        leaves = [t.detach().to(device, torch.float64).requires_grad_() for t in (self.q, self.k, self.v)]
        options = dict(causal=self.causal, window_size=self.window_size, softcap=self.softcap, softmax_scale=self.scale)
        if self.cu_seqlens_q is None:
            out, lse = attention_oracle(*leaves, key_mask=self.key_mask, **options)
        else:
            out, lse = varlen_oracle(*leaves, self.cu_seqlens_q, self.cu_seqlens_k, **options)
        loss = (out * self.dout.to(device, torch.float64)).sum()
        if with_dlse:
            finite = torch.isfinite(lse)
            loss = loss + (torch.where(finite, lse, torch.zeros_like(lse)) * self.dlse.to(device, torch.float64)).sum()
        # Inputs no output depends on (keys of empty sequences, say) get zero gradients.
        grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else (None,) * 3
        grads = [torch.zeros_like(leaf) if grad is None else grad for grad, leaf in zip(grads, leaves)]
        return tuple(t.detach().cpu() for t in (out, lse, *grads))


def padded_case(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, mask_kind="none", **options) -> Case:
    q = torch.randn(batch, seqlen_q, heads_q, head_dim).to(dtype)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim).to(dtype)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim).to(dtype)
    return Case(q, k, v, key_padding_mask(mask_kind, batch, seqlen_k), **options)


def varlen_case(lengths_q, lengths_k, heads_q, heads_kv, head_dim, dtype, **options) -> Case:
    q = torch.randn(sum(lengths_q), heads_q, head_dim).to(dtype)
    k = torch.randn(sum(lengths_k), heads_kv, head_dim).to(dtype)
    v = torch.randn(sum(lengths_k), heads_kv, head_dim).to(dtype)
    return Case(q, k, v, None, offsets(lengths_q), offsets(lengths_k), **options)


def check(case: Case, got: tuple[Tensor, ...], with_dlse: bool = False, device: str | torch.device = "cpu") -> None:
    """Compares (out, lse, dq, dk, dv) from a kernel with the oracle (computed on `device`)."""
    out, lse, dq, dk, dv = (t.detach().cpu() for t in got)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = case.oracle(with_dlse, device)
    dtype = case.q.dtype
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "lse must be -inf exactly on the rows that see no key"
    assert (lse[~finite] == float("-inf")).all(), "rows that see no key: lse = -inf (not NaN or +inf)"
    if finite.any():
        assert_close(lse[finite], ref_lse[finite], torch.float32, "lse")
    assert_close(out, ref_out, dtype, "out")
    for name, grad, ref in (("dq", dq, ref_dq), ("dk", dk, ref_dk), ("dv", dv, ref_dv)):
        assert_close(grad, ref, dtype, name)
    # Rows that see no key output exact zeros and get exact zero query gradients.
    rows = ~finite.transpose(-1, -2) if case.cu_seqlens_q is None else ~finite.T  # (B, Sq, Hq) or (Tq, Hq)
    if rows.any():
        assert out[rows].abs().max().item() == 0.0, "rows that see no key must output zeros"
        assert dq[rows].abs().max().item() == 0.0, "rows that see no key must get zero dq"

    # Keys no query sees (dv = P^T dout is 0 only there, for random dout) get exact zero gradients.
    unseen = (ref_dv == 0).all(dim=-1)
    if unseen.any():
        assert dk[unseen].abs().max().item() == 0.0, "dk must be exactly 0 for keys no query sees"
        assert dv[unseen].abs().max().item() == 0.0, "dv must be exactly 0 for keys no query sees"


def run_public_api(
    case: Case, backend: str, device: str | torch.device, deterministic: bool = False, with_dlse: bool = False
) -> tuple[Tensor, ...]:
    """(out, lse, dq, dk, dv) of the public functions on `device`, backpropagating case.dout (and dlse)."""
    q, k, v = (t.to(device).requires_grad_() for t in (case.q, case.k, case.v))
    options = dict(
        causal=case.causal,
        softmax_scale=case.scale,
        window_size=case.window_size,
        softcap=case.softcap,
        return_lse=True,
        deterministic=deterministic,
        backend=backend,
    )
    if case.cu_seqlens_q is None:
        mask = None if case.key_mask is None else case.key_mask.to(device)
        out, lse = flash_attn_func(q, k, v, mask, **options)
    else:
        out, lse = flash_attn_varlen_func(
            q, k, v, case.cu_seqlens_q.to(device), case.cu_seqlens_k.to(device), *case.max_seqlens, **options
        )
    outputs, grads_in = [out], [case.dout.to(device)]
    if with_dlse:
        outputs.append(lse)
        grads_in.append(case.dlse.to(device))
    grads = torch.autograd.grad(outputs, (q, k, v), grads_in)
    return (out.detach(), lse.detach(), *grads)
