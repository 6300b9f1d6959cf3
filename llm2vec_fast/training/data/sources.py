"""Endless, resumable streams of micro-batches for each objective, read from local files.

Each source walks a reproducible order (`sampling`), tokenizes only the examples this process
uses, and can report and restore its exact position (``state_dict``), including partly consumed
token buffers, so a resumed run sees exactly the batches an uninterrupted run would have seen.

The contrastive sources take the same keyword-only settings (the ``options`` the objectives build
once for either), so their constructor signatures repeat; what they read and order differs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from ...text import split_at_instruction, tokenize_with_instruction
from .batches import ContrastiveBatch, MNTPBatch
from .masking import MaskingRule, prediction_targets
from .records import ContrastiveFile, TextLines
from .sampling import GroupedBatchOrder, StridedOrder


def _token_ids(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int | None, special: bool = True
) -> list[list[int]]:
    truncation = {"truncation": True, "max_length": max_length} if max_length is not None else {}
    return tokenizer(texts, add_special_tokens=special, **truncation)["input_ids"]


class MNTPSource:
    """MNTP micro-batches from text lines, either each line its own sequence ("lines") or all
    lines concatenated and cut into ``max_seq_length`` blocks ("concat", LLM2Vec's default).

    A batch holds ``per_device_train_batch_size`` sequences, or as many as fit in
    ``max_tokens_per_batch`` tokens when that is set (token-budget batching: no padding is
    computed, so the budget bounds memory directly).
    """

    def __init__(
        self,
        lines: TextLines,
        tokenizer: PreTrainedTokenizerBase,
        rule: MaskingRule,
        *,
        layout: str,
        max_seq_length: int,
        batch_size: int,
        max_tokens_per_batch: int | None,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        if layout not in ("concat", "lines"):
            raise ValueError(f"data_layout must be 'concat' or 'lines', got {layout!r}")
        if max_tokens_per_batch is not None and max_tokens_per_batch < max_seq_length:
            raise ValueError(
                f"max_tokens_per_batch ({max_tokens_per_batch}) must be at least max_seq_length ({max_seq_length})"
            )
        self.lines, self.tokenizer, self.rule = lines, tokenizer, rule
        self.layout, self.max_seq_length, self.batch_size = layout, max_seq_length, batch_size
        self.max_tokens = max_tokens_per_batch
        self.seed, self.rank = seed, rank
        self.order = StridedOrder(len(lines), seed, rank, world_size)
        self.buffer: list[int] = []
        self.blocks_made = 0
        self.pending: tuple[list[int], list[int]] | None = None

    def _next_sequence(self) -> tuple[list[int], list[int]]:
        """``(token_ids, masking_key)`` of the next sequence of this process."""
        if self.layout == "lines":
            epoch, item = self.order.next()
            ids = _token_ids(self.tokenizer, [self.lines[item]], self.max_seq_length)[0]
            return ids, [epoch, item]
        while len(self.buffer) < self.max_seq_length:
            _, item = self.order.next()
            self.buffer.extend(_token_ids(self.tokenizer, [self.lines[item]], None)[0])
        block, self.buffer = self.buffer[: self.max_seq_length], self.buffer[self.max_seq_length :]
        self.blocks_made += 1
        return block, [self.rank, self.blocks_made]

    def next_batch(self) -> MNTPBatch:
        sequences, rows, cols, ids = [], [], [], []
        budget = self.max_tokens
        used = 0
        while True:
            tokens, key = self.pending if self.pending is not None else self._next_sequence()
            self.pending = None
            if budget is not None and sequences and used + len(tokens) > budget:
                self.pending = (tokens, key)
                break
            original = np.asarray(tokens, dtype=np.int64)
            corrupted, selected = self.rule.apply(original, np.random.default_rng([self.seed, *key]))
            targets = prediction_targets(selected)
            rows.append(np.full(targets.size, len(sequences), dtype=np.int64))
            cols.append(targets)
            ids.append(original[targets])
            sequences.append(corrupted.tolist())
            used += len(tokens)
            if budget is None and len(sequences) == self.batch_size:
                break
        return MNTPBatch(sequences, np.concatenate(rows), np.concatenate(cols), np.concatenate(ids))

    def state_dict(self) -> dict[str, Any]:
        return {
            "order": self.order.state_dict(),
            "buffer": list(self.buffer),
            "blocks_made": self.blocks_made,
            "pending": self.pending,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state["order"])
        self.buffer, self.blocks_made = list(state["buffer"]), int(state["blocks_made"])
        self.pending = tuple(state["pending"]) if state["pending"] is not None else None


def tokenize_for_embedding(
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[tuple[str, str]],
    max_length: int,
    *,
    append_eos: bool = False,
    template: str | None = None,
) -> tuple[list[list[int]], list[int]]:
    """Token ids of ``(instruction, text)`` pairs as LLM2Vec trains on them, and how many tokens precede the text.

    As the official supervised collator: the string is ``"{instruction}; " + SEPARATOR + text`` (just
    ``SEPARATOR + text`` without instruction), wrapped in the chat `template` if any (e.g.
    ``"[INST] {} [/INST]"``); the model reads it without the separator, and pooling covers only what
    followed the separator (BOS, template prefix and instruction are skipped, LLM2Vec's ``embed_mask``;
    a separator inside the text or instruction is kept, see :mod:`llm2vec_fast.text`).
    With `append_eos` (``eos_token`` pooling) EOS ends every sequence.
    """
    limit = max_length - 1 if append_eos else max_length
    wrap = (lambda marked: template.format(marked.strip())) if template is not None else (lambda marked: marked)
    heads = [f"{instruction}; " if instruction else "" for instruction, _ in pairs]
    prepared = [split_at_instruction(head, text, wrap) for head, (_, text) in zip(heads, pairs)]
    full, instruction_lengths = tokenize_with_instruction(tokenizer, prepared, limit)
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("eos_token pooling needs a tokenizer with an EOS token")
        full = [ids + [tokenizer.eos_token_id] for ids in full]
    return full, instruction_lengths


class SimCSESource:
    """SimCSE micro-batches: each sentence twice (queries, then the same sentences as positives)."""

    def __init__(
        self,
        lines: TextLines,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_seq_length: int,
        batch_size: int,
        append_eos: bool,
        template: str | None,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.lines, self.tokenizer = lines, tokenizer
        self.max_seq_length, self.batch_size = max_seq_length, batch_size
        self.options = {"append_eos": append_eos, "template": template}
        self.order = StridedOrder(len(lines), seed, rank, world_size)

    def next_batch(self) -> ContrastiveBatch:
        texts = [self.lines[self.order.next()[1]] for _ in range(self.batch_size)]
        ids, instruction_lengths = tokenize_for_embedding(
            self.tokenizer, [("", t) for t in texts], self.max_seq_length, **self.options
        )
        return ContrastiveBatch(ids + [list(s) for s in ids], instruction_lengths * 2, num_queries=len(ids))

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state["order"])


class SupervisedSource:
    """Supervised micro-batches (query with instruction, positive, hard negatives), one data set per global batch."""

    def __init__(
        self,
        datasets: list[ContrastiveFile],
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_seq_length: int,
        batch_size: int,
        append_eos: bool,
        template: str | None,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.datasets, self.tokenizer = datasets, tokenizer
        self.max_seq_length = max_seq_length
        self.options = {"append_eos": append_eos, "template": template}
        self.order = GroupedBatchOrder([len(d) for d in datasets], batch_size, seed, rank, world_size)

    def _example(self, item: int):
        group = self.order.group_of(item)
        return self.datasets[group][item - int(self.order.group_offsets[group])]

    def next_batch(self) -> ContrastiveBatch:
        _, items = self.order.next()
        examples = [self._example(int(i)) for i in items]
        pairs = [(e.instruction, e.query) for e in examples] + [("", e.positive) for e in examples]
        pairs += [("", negative) for e in examples for negative in e.negatives]
        ids, instruction_lengths = tokenize_for_embedding(self.tokenizer, pairs, self.max_seq_length, **self.options)
        return ContrastiveBatch(ids, instruction_lengths, num_queries=len(examples))

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order.load_state_dict(state["order"])
