"""Per-mask state each backend's kernels read, derived once per mask tensor.

Every layer of a forward (and of its backward) passes the same key-padding mask: what a backend
derives from it (the Triton kernels' key spans, the CUDA kernels' packed bits) is computed once
and cached while the mask is unchanged (`TensorCache`). A backend names the form it reads in its
``KEY_MASK_FORM``: "bool" (the mask itself), "spans" (`KeySpans`) or "bits" (packed int32 rows).

Spans: intervals of keys that start and end on a real key and contain no run of SPLIT_GAP or more
padding keys (one span for left or right padding). The Triton kernels loop over spans and over
tiles inside them, so long stretches of padding are never visited; the shorter holes inside a
span are masked with the per-key mask bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .tensor_cache import TensorCache

SPLIT_GAP = 64  # padding gaps at least this long are skipped; shorter ones are masked


class KeySpans(NamedTuple):
    """A bool (B, Sk) mask as the Triton kernels index it (contiguous rows)."""

    mask_bytes: Tensor  # uint8 (B, Sk), 1 = real key
    spans: Tensor  # int32 (B, R, 2): [start, end) of each span of keys
    num_spans: Tensor  # int32 (B,)


def key_spans(key_mask: Tensor, split_gap: int = SPLIT_GAP) -> tuple[Tensor, Tensor]:
    """Spans of keys per row: (B, R, 2) int32 [start, end) pairs and (B,) span counts.

    A span starts at a real key preceded by at least `split_gap` padding keys (or none before it)
    and ends at a real key followed likewise. Computed with scans and scatters, never nonzero(),
    so it does not wait on the device; slot R of the scratch buffer absorbs non-events.
    """
    batch, seqlen = key_mask.shape
    max_spans = seqlen // (split_gap + 1) + 1
    positions = torch.arange(seqlen, device=key_mask.device, dtype=torch.int32).expand(batch, seqlen)
    far = seqlen + split_gap + 1
    last_real = torch.where(key_mask, positions, -far).cummax(dim=1).values
    next_real = torch.where(key_mask, positions, 2 * far).flip(1).cummin(dim=1).values.flip(1)
    prev_real = torch.nn.functional.pad(last_real[:, :-1], (1, 0), value=-far)
    following_real = torch.nn.functional.pad(next_real[:, 1:], (0, 1), value=2 * far)
    starts = key_mask & (positions - prev_real > split_gap)
    ends = key_mask & (following_real - positions > split_gap)
    spans = torch.zeros(batch, 2, max_spans + 1, dtype=torch.int32, device=key_mask.device)
    for side, events, value in ((0, starts, positions), (1, ends, positions + 1)):
        slot = torch.where(events, events.cumsum(dim=1) - 1, max_spans)
        spans[:, side].scatter_(1, slot, value)
    return spans[:, :, :max_spans].transpose(1, 2).contiguous(), starts.sum(dim=1, dtype=torch.int32)


def kernel_spans(key_mask: Tensor) -> KeySpans:
    """Mask bytes and spans (a view such as ``mask.t()`` or ``mask[:, ::2]`` is copied, B * Sk bytes)."""
    return KeySpans(key_mask.contiguous().view(torch.uint8), *key_spans(key_mask))


def packed_bits(key_mask: Tensor) -> Tensor:
    """The CUDA kernels' packed rows (the extension's packer reads the mask with its strides)."""
    return torch.ops.llm2vec_fast_cuda.pack_key_mask(key_mask)


_FORMS: dict[str, Callable[[Tensor], object]] = {"spans": kernel_spans, "bits": packed_bits}
_derived = TensorCache()


def derive(key_mask: Tensor | None, form: str) -> object:
    """What a backend reading `form` needs of `key_mask` (None without a mask), cached per mask and form."""
    if key_mask is None or form == "bool":
        return key_mask
    return _derived.get(key_mask, form, lambda: _FORMS[form](key_mask))
