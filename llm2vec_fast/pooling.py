"""Sentence embeddings from token hidden states, on packed tokens (no padding) or on a padded batch.

Modes (LLM2Vec's):
- ``mean``: average of the pooled tokens;
- ``weighted_mean``: position-weighted average, weights ``1, 2, ..., n`` over the pooled tokens
  (later tokens, which in a causal-trained model have seen more context, weigh more);
- ``eos_token`` / ``last_token``: the sequence's last token (with ``eos_token`` the encoder appends EOS);
- ``bos_token``: the sequence's first token.

``instruction_lengths`` optionally gives, per sequence, how many leading tokens (the instruction) to leave
out of ``mean``/``weighted_mean``: they are attended to by the model but not averaged. If a sequence
has no token left after skipping, all its tokens are pooled; an empty sequence pools to zeros.
Pooling accumulates in float32 and returns float32, whatever the hidden states' dtype. Each
sequence is reduced on its own (segment reductions), so its embedding does not depend on what
else is in the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .padding import unpad_input
from .validation import check_cu_seqlens_values

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")


def check_pooling_mode(mode: str) -> str:
    if mode not in POOLING_MODES:
        raise ValueError(f"unknown pooling mode {mode!r}: choose one of {', '.join(POOLING_MODES)}")
    return mode


def _check_instruction_lengths(lengths: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
    if lengths is None:
        return None
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.shape != (batch,) or lengths.dtype.is_floating_point:
        raise ValueError(
            f"instruction_lengths must be an integer tensor of shape ({batch},), "
            f"got {lengths.dtype} {tuple(lengths.shape)}"
        )
    return lengths.to(device=device, dtype=torch.long)


def pool_packed(
    hidden_states: Tensor, cu_seqlens: Tensor, mode: str = "mean", instruction_lengths: Tensor | None = None
) -> Tensor:
    """Pool packed hidden states ``(T, H)`` of the sequences `cu_seqlens` (``B + 1`` offsets) delimits: ``(B, H)``."""
    check_pooling_mode(mode)
    if hidden_states.dim() != 2:
        raise ValueError(
            f"hidden_states must be packed as (total_tokens, hidden), got shape {tuple(hidden_states.shape)}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D tensor of batch + 1 offsets, got shape {tuple(cu_seqlens.shape)}")
    device = hidden_states.device
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    batch, total = lengths.numel(), hidden_states.shape[0]
    instruction = _check_instruction_lengths(instruction_lengths, batch, device)
    hidden = hidden_states.float()
    if mode in ("eos_token", "last_token", "bos_token"):
        rows = (cu[1:] - 1) if mode != "bos_token" else cu[:-1]
        if total == 0:
            return hidden.new_zeros(batch, hidden.shape[1])
        return hidden.index_select(0, rows.clamp(0, total - 1)) * (lengths > 0).unsqueeze(-1)
    sequence = torch.repeat_interleave(torch.arange(batch, device=device), lengths, output_size=total)
    position = torch.arange(total, device=device) - cu[:-1].index_select(0, sequence)
    start = (
        torch.zeros_like(lengths)
        if instruction is None
        else torch.where(instruction < lengths, instruction.clamp_min(0), 0)
    )
    offset = position - start.index_select(0, sequence)
    weights = (offset >= 0).float() if mode == "mean" else (offset + 1).clamp_min(0).float()
    # segment_reduce's own check of the lengths reads them back (a host sync per call): ours reads the offsets
    # once per tensor, never for offsets checked on the host (pack_sequences, unpad_input), so it runs unsafe
    check_cu_seqlens_values("cu_seqlens", cu_seqlens, total, total)
    norms = torch.segment_reduce(weights, "sum", lengths=lengths, axis=0, unsafe=True)
    sums = torch.segment_reduce(hidden * weights.unsqueeze(-1), "sum", lengths=lengths, axis=0, unsafe=True)
    return sums / norms.clamp_min(1.0).unsqueeze(-1)


def pool_padded(
    hidden_states: Tensor, attention_mask: Tensor, mode: str = "mean", instruction_lengths: Tensor | None = None
) -> Tensor:
    """Pool a padded batch ``(B, S, H)`` (any padding side; `attention_mask` nonzero = real token) into ``(B, H)``."""
    packed, _, cu_seqlens, _ = unpad_input(hidden_states, attention_mask)
    return pool_packed(packed, cu_seqlens, mode, instruction_lengths)
