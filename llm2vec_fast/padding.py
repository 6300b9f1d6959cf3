"""Moving between padded batches ``(batch, seqlen, ...)`` and packed tokens ``(total, ...)``.

Both directions are differentiable index operations, so a model can unpad once, run every layer
on real tokens only, and pad back (or pool) at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .tensor_cache import cacheable
from .validation import check_host_offsets, normalize_key_mask


def _check_padded(hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
    if not isinstance(hidden_states, Tensor) or hidden_states.dim() < 2:
        raise ValueError("hidden_states must be a tensor of shape (batch, seqlen, ...)")
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2 or attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(
            f"attention_mask must have shape (batch, seqlen) = {tuple(hidden_states.shape[:2])}, "
            f"got {tuple(attention_mask.shape)}"
        )
    return normalize_key_mask(attention_mask, hidden_states, hidden_states)


def unpad_input(hidden_states: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
    """Keep only the real tokens of a padded batch.

    Args:
        hidden_states: ``(batch, seqlen, ...)``.
        attention_mask: ``(batch, seqlen)`` bool or integer, nonzero = real token (any padding side).

    Returns:
        ``(packed, indices, cu_seqlens, max_seqlen)``: ``packed`` is ``(total, ...)``, ``indices``
        the positions of the real tokens in the flattened ``batch * seqlen`` axis, ``cu_seqlens``
        int32 ``(batch + 1,)`` offsets, ``max_seqlen`` the longest sequence (a Python int).
    """
    mask = _check_padded(hidden_states, attention_mask)
    seqlens = mask.sum(dim=-1, dtype=torch.int32)
    # The two host syncs of a padded batch, intrinsic (the token count and the lengths live on the device): once
    # per batch, and the offsets read here are remembered as checked, so the ops never read them again.
    indices = torch.nonzero(mask.flatten()).flatten()
    cu_seqlens = cacheable(torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0)))
    offsets = cu_seqlens.tolist()
    check_host_offsets(cu_seqlens, offsets)
    max_seqlen = max((end - start for start, end in zip(offsets, offsets[1:])), default=0)
    packed = hidden_states.reshape(-1, *hidden_states.shape[2:]).index_select(0, indices)
    return packed, indices, cu_seqlens, max_seqlen


def pad_input(packed: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Inverse of :func:`unpad_input`: scatter packed tokens back to ``(batch, seqlen, ...)``, zeros elsewhere."""
    if packed.shape[0] != indices.numel():
        raise ValueError(f"packed holds {packed.shape[0]} tokens but indices has {indices.numel()} entries")
    padded = packed.new_zeros((batch * seqlen, *packed.shape[1:]))
    return padded.index_copy(0, indices, packed).view(batch, seqlen, *packed.shape[1:])
