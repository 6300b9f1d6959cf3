"""MNTP masking: which tokens are masked, what replaces them, and which position predicts each.

As LLM2Vec (after BERT): every token that is not special is selected with probability ``p``; a
selected token is replaced by the mask token ("all_mask"), or 80% mask token / 10% random token /
10% unchanged ("default"). Unlike BERT, the prediction of token ``i`` is read at position ``i - 1``
(the "next token" of a decoder), so the first token of a sequence is never a target.

Randomness comes from a generator seeded by the caller per sequence (seed, epoch, sample id), so
masks do not depend on batch composition, process count or where a run was resumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

MASK_TOKENS = {"blank": "_", "mask": "<mask>"}


@dataclass(frozen=True)
class MaskingRule:
    """How MNTP corrupts a sequence."""

    probability: float
    strategy: str  # "default" (80/10/10) or "all_mask"
    mask_token_id: int
    vocab_size: int
    special_ids: np.ndarray

    def __post_init__(self):
        if not 0.0 < self.probability <= 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1], got {self.probability}")
        if self.strategy not in ("default", "all_mask"):
            raise ValueError(f"data_collator_type must be 'default' or 'all_mask', got {self.strategy!r}")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"mask token id {self.mask_token_id} is outside the vocabulary of {self.vocab_size}")

    def apply(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``(corrupted_ids, selected)`` for one sequence; ``selected`` marks the masked positions."""
        selected = (rng.random(ids.shape[0]) < self.probability) & ~np.isin(ids, self.special_ids)
        corrupted = ids.copy()
        if self.strategy == "all_mask":
            corrupted[selected] = self.mask_token_id
            return corrupted, selected
        draw = rng.random(ids.shape[0])
        random_ids = rng.integers(0, self.vocab_size, size=ids.shape[0])
        to_mask = selected & (draw < 0.8)
        to_random = selected & (draw >= 0.8) & (draw < 0.9)
        corrupted[to_mask] = self.mask_token_id
        corrupted[to_random] = random_ids[to_random]
        return corrupted, selected


def prediction_targets(selected: np.ndarray) -> np.ndarray:
    """Positions ``i >= 1`` whose original token is predicted (from the hidden state at ``i - 1``)."""
    positions = np.flatnonzero(selected)
    return positions[positions >= 1]


def add_mask_token(tokenizer: PreTrainedTokenizerBase, mask_token_type: str) -> bool:
    """Set ``tokenizer.mask_token`` as LLM2Vec does: ``_`` ("blank"), EOS ("eos") or a new ``<mask>`` ("mask").

    A tokenizer that already has a mask token keeps it. Returns True when a token was added to the
    vocabulary (the model's embeddings must then be resized).
    """
    if tokenizer.mask_token is not None:
        return False
    if mask_token_type == "eos":
        if tokenizer.eos_token is None:
            raise ValueError("mask_token_type 'eos' needs a tokenizer with an EOS token")
        tokenizer.mask_token = tokenizer.eos_token
        return False
    if mask_token_type not in MASK_TOKENS:
        raise ValueError(f"mask_token_type must be 'blank', 'eos' or 'mask', got {mask_token_type!r}")
    token = MASK_TOKENS[mask_token_type]
    added = False
    if mask_token_type == "mask":
        added = tokenizer.add_tokens([token]) > 0
    tokenizer.mask_token = token
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(
            f"the mask token {token!r} is not a single token of this tokenizer; choose mask_token_type 'eos' or 'mask'"
        )
    return added


def masking_rule(tokenizer: PreTrainedTokenizerBase, probability: float, strategy: str) -> MaskingRule:
    """The rule for `tokenizer`, whose mask token must already be set (see `add_mask_token`)."""
    special = sorted(set(tokenizer.all_special_ids) - {tokenizer.mask_token_id})
    return MaskingRule(
        probability, strategy, int(tokenizer.mask_token_id), len(tokenizer), np.asarray(special, dtype=np.int64)
    )
