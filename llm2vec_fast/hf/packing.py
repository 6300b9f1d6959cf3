"""Unpad a padded batch once per forward, so every layer runs on real tokens only.

A padded ``(B, S)`` batch becomes one row of ``T`` real tokens with per-sequence position ids and
``cu_seqlens`` offsets. transformers passes ``cu_seq_lens_q/k`` and ``max_length_q/k`` down to each
attention call, where our attention picks the variable-length op; projections, MLPs and norms are
per-token and simply see ``T`` tokens instead of ``B * S``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..padding import pad_input, unpad_input
from ..tensor_cache import cacheable
from ..validation import check_host_offsets


@dataclass(frozen=True)
class PackedBatch:
    """Real tokens of a padded batch laid end to end.

    Attributes:
        input_ids: ``(1, T)`` token ids of every sequence, one after another.
        position_ids: ``(1, T)`` positions restarting at 0 for each sequence.
        cu_seqlens: int32 ``(B + 1,)`` offsets of each sequence in the packed row.
        max_seqlen: the longest sequence.
        indices: ``(T,)`` positions of the real tokens in the flattened ``B * S`` padded batch.
        batch_size, seqlen: shape of the padded batch, to scatter results back.
    """

    input_ids: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    indices: Tensor
    batch_size: int
    seqlen: int

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def seqlens(self) -> Tensor:
        """``(B,)`` int32 length of each sequence."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for a transformers (or peft) model forward on the packed tokens.

        The model must route attention through ``llm2vec_fast`` (``enable_bidirectional`` or
        ``attn_implementation="llm2vec_fast"``); other attention implementations would attend across
        sequence boundaries.
        """
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }

    def pad(self, packed: Tensor) -> Tensor:
        """Scatter ``(1, T, ...)`` or ``(T, ...)`` packed values back to ``(B, S, ...)``, zeros at padding."""
        if packed.dim() >= 2 and packed.shape[0] == 1 and packed.shape[1] == self.num_tokens:
            packed = packed[0]
        if packed.shape[0] != self.num_tokens:
            raise ValueError(f"expected {self.num_tokens} packed tokens, got a tensor of shape {tuple(packed.shape)}")
        return pad_input(packed, self.indices, self.batch_size, self.seqlen)

    def unpad(self, padded: Tensor) -> Tensor:
        """Pack another ``(B, S, ...)`` tensor (labels, embeddings, ...) the same way: ``(1, T, ...)``."""
        if tuple(padded.shape[:2]) != (self.batch_size, self.seqlen):
            raise ValueError(
                f"expected a tensor of shape ({self.batch_size}, {self.seqlen}, ...), got {tuple(padded.shape)}"
            )
        flat = padded.reshape(self.batch_size * self.seqlen, *padded.shape[2:])
        return flat.index_select(0, self.indices).unsqueeze(0)


def _positions(cu_seqlens: Tensor, total: int) -> Tensor:
    seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), seqlens, output_size=total)
    return (torch.arange(total, device=cu_seqlens.device) - starts).unsqueeze(0)


def pack_sequences(sequences: Sequence[Sequence[int]], device: torch.device | str | None = None) -> PackedBatch:
    """Pack token-id lists directly (no padded batch is ever built); ``pad`` scatters to a right-padded layout."""
    lengths = [len(ids) for ids in sequences]
    if not lengths:
        raise ValueError("pack_sequences needs at least one sequence")
    seqlen = max(lengths)
    flat = [token for ids in sequences for token in ids]
    input_ids = torch.tensor(flat, dtype=torch.long).to(device)
    lengths_t = torch.tensor(lengths, dtype=torch.long)
    offsets = torch.nn.functional.pad(torch.cumsum(lengths_t, 0), (1, 0))  # on the host: no device round trip
    cu_seqlens = cacheable(offsets.to(device=device, dtype=torch.int32))
    check_host_offsets(cu_seqlens, [0, *itertools.accumulate(lengths)])  # the ops never read them back
    rows = torch.repeat_interleave(torch.arange(len(lengths)), lengths_t)
    columns = torch.arange(len(flat)) - torch.repeat_interleave(offsets[:-1], lengths_t)
    return PackedBatch(
        input_ids=input_ids.unsqueeze(0),
        position_ids=_positions(cu_seqlens, len(flat)),
        cu_seqlens=cu_seqlens,
        max_seqlen=seqlen,
        indices=(rows * seqlen + columns).to(device),
        batch_size=len(lengths),
        seqlen=seqlen,
    )


def pack_batch(input_ids: Tensor, attention_mask: Tensor | None = None) -> PackedBatch:
    """Pack a padded ``(B, S)`` batch (any padding side; mask nonzero = real token; None = no padding)."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seqlen), got {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    packed_ids, indices, cu_seqlens, max_seqlen = unpad_input(input_ids, attention_mask)
    cu_seqlens = cacheable(cu_seqlens)
    return PackedBatch(
        input_ids=packed_ids.unsqueeze(0),
        position_ids=_positions(cu_seqlens, packed_ids.shape[0]),
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        indices=indices,
        batch_size=input_ids.shape[0],
        seqlen=input_ids.shape[1],
    )
