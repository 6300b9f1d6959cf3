"""What one training micro-batch holds, for each objective, and its two device layouts.

A batch keeps its sequences as token-id lists. On our kernels it goes to the device packed
(``pack_sequences``: real tokens only, never a padded block); on the reference path (HF SDPA or
eager attention with a padding mask, for parity checks and benchmarks) it goes right-padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def pad_right(
    sequences: list[list[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, both ``(len(sequences), longest)`` int64, padding on the right."""
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        input_ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
        attention_mask[row, : len(tokens)] = 1
    return input_ids.to(device), attention_mask.to(device)


@dataclass
class TokenBatch:
    """Token ids of the sequences of a micro-batch (no padding)."""

    sequences: list[list[int]]

    def __post_init__(self):
        if not self.sequences or any(len(s) == 0 for s in self.sequences):
            raise ValueError("a batch needs at least one sequence and every sequence at least one token")

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(s) for s in self.sequences), dtype=np.int64, count=len(self.sequences))

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def num_loss_terms(self) -> int:
        raise NotImplementedError


@dataclass
class MNTPBatch(TokenBatch):
    """Corrupted sequences and, per predicted token, its sequence (row), position (col >= 1) and original id.

    The prediction of the token at ``(row, col)`` is read from the hidden state at ``(row, col - 1)``.
    """

    target_rows: np.ndarray
    target_cols: np.ndarray
    target_ids: np.ndarray

    @property
    def num_loss_terms(self) -> int:
        return int(self.target_ids.size)

    def packed_sources(self) -> np.ndarray:
        """Index, among the packed tokens, of the hidden state predicting each target."""
        starts = np.concatenate(([0], np.cumsum(self.lengths)[:-1]))
        return starts[self.target_rows] + self.target_cols - 1

    def padded_sources(self, seqlen: int) -> np.ndarray:
        """Index, in the flattened right-padded ``(B * seqlen)`` block, of the hidden state predicting each target."""
        return self.target_rows * seqlen + self.target_cols - 1


@dataclass
class ContrastiveBatch(TokenBatch):
    """Queries, then their positives, then all hard negatives.

    ``instruction_lengths[i]`` counts the tokens of sequence ``i`` before its text proper (BOS, instruction),
    which pooling leaves out as LLM2Vec's ``embed_mask`` does.
    """

    instruction_lengths: list[int]
    num_queries: int

    def __post_init__(self):
        super().__post_init__()
        if len(self.instruction_lengths) != len(self.sequences) or len(self.sequences) < 2 * self.num_queries:
            raise ValueError("a contrastive batch needs an instruction length per sequence and a positive per query")

    @property
    def num_loss_terms(self) -> int:
        return self.num_queries
