"""Text preparation shared by encoding and training: instruction separator, chat templates, EOS suffixes,
``doc_max_length`` trimming and the one tokenize-with-instruction function.

The official llm2vec marks where the instruction ends by joining ``instruction + SEPARATOR + text``
and splitting the prepared string on the separator again. Here a prepared input is kept as a pair
``(head, tail)``: ``head`` is everything the model reads before the text (BOS comes from the
tokenizer, then a template prefix and the instruction), ``tail`` the text and what follows it (a
template suffix, EOS). The model reads ``head + tail``; pooling skips the tokens of ``head``. So a
text (or instruction) that itself contains the separator keeps its characters and its boundary.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

INSTRUCTION_SEPARATOR = "!@#$%^&*()"
"""Official llm2vec marker between instruction and text in a prepared string."""

CHAT_TEMPLATES = {
    "meta-llama/Meta-Llama-3-8B-Instruct": "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
    "mistralai/Mistral-7B-Instruct-v0.2": "[INST] {} [/INST]",
    "meta-llama/Llama-2-7b-chat-hf": "[INST] {} [/INST]",
    "google/gemma-2-9b-it": "<bos><start_of_turn>user\n{}<end_of_turn>",
    "Qwen/Qwen2-1.5B-Instruct": "<|im_start|>user\n{}<|im_end|>",
    "Qwen/Qwen2-7B-Instruct": "<|im_start|>user\n{}<|im_end|>",
}
"""Chat templates the official encoder applies for these exact model names."""

EOS_SUFFIXES = {"llama": " </s>", "mistral": " </s>", "gemma": "<eos>", "qwen2": "<|endoftext|>"}
"""What the official encoder appends for ``eos_token`` pooling, by model type (else the tokenizer's EOS)."""

_NO_TEMPLATE_EOS = "meta-llama/Meta-Llama-3-8B-Instruct"  # its template already ends the turn
_LLAMA3_BASE, _LLAMA3_EOS = "meta-llama/Meta-Llama-3-8B", "<|end_of_text|>"
_PRIVATE_USE = 0xE000  # first code point tried as an in-memory boundary marker
_TOKENIZER_LOCK = threading.RLock()
"""A fast tokenizer stores its truncation setting on the shared Rust object for each call: two threads
calling it with different settings would truncate each other's texts (or fail with "Already borrowed")."""


def _tokenize(tokenizer: Any, texts: str | list[str], **options: Any) -> Any:
    with _TOKENIZER_LOCK:
        return tokenizer(texts, **options)


def prepare_for_tokenization(text: str, *, model_name: str, model_type: str | None, eos_token: str | None) -> str:
    """The official text preparation: the chat template of known instruct models, then, when `eos_token`
    is given (``eos_token`` pooling), the model type's EOS suffix (`eos_token` for unknown types)."""
    if model_name in CHAT_TEMPLATES:
        text = CHAT_TEMPLATES[model_name].format(text.strip())
        if model_name == _NO_TEMPLATE_EOS:
            return text
    if eos_token is None:
        return text
    if model_name == _LLAMA3_BASE:
        return text.strip() + _LLAMA3_EOS
    return text.strip() + EOS_SUFFIXES.get(model_type or "", eos_token)


def split_at_instruction(head: str, tail: str, wrap: Callable[[str], str]) -> tuple[str, str]:
    """``(head', tail')`` of ``wrap(head + SEPARATOR + tail)`` cut where the separator went, however the
    two parts themselves are spelled (`wrap` applies templates and suffixes; it must not drop the cut)."""
    marker = _absent_character(head, tail)
    before, found, after = wrap(f"{head}{marker}{tail}").partition(marker)
    if not found:
        raise ValueError("text preparation dropped the instruction boundary")
    return before, after


def _absent_character(*parts: str) -> str:
    """A private-use character occurring in none of `parts` (one character: it cannot overlap itself)."""
    code = _PRIVATE_USE
    while any(chr(code) in part for part in parts):
        code += 1
    return chr(code)


def split_prepared(prepared: str) -> tuple[str, str]:
    """``(head, tail)`` of an official prepared string, cut at its first separator (no separator: all head)."""
    head, _, tail = prepared.partition(INSTRUCTION_SEPARATOR)
    return head, tail


def token_counts(tokenizer: Any, texts: list[str], max_length: int | None) -> list[int]:
    """Tokens in each text without special tokens, counted up to `max_length` (None: all)."""
    truncation = {"truncation": True, "max_length": max_length} if max_length is not None else {}
    return [len(ids) for ids in _tokenize(tokenizer, texts, add_special_tokens=False, **truncation)["input_ids"]]


def tokenize_with_instruction(
    tokenizer: Any, prepared: list[tuple[str, str]], max_length: int | None
) -> tuple[list[list[int]], list[int]]:
    """Token ids of each ``(head, tail)`` read as ``head + tail`` (special tokens added, at most
    `max_length`, None: no limit) and its instruction length: how many leading tokens pooling skips
    (all but the tokens `tail` alone has, as the official ``embed_mask``)."""
    truncation = {"truncation": True, "max_length": max_length} if max_length is not None else {}
    ids = _tokenize(tokenizer, [head + tail for head, tail in prepared], **truncation)["input_ids"]
    tail_counts = token_counts(tokenizer, [tail for _, tail in prepared], max_length)
    return ids, [max(len(row) - count, 0) for row, count in zip(ids, tail_counts)]


def trim_to_tokens(tokenizer: Any, texts: list[str], budget: int, max_length: int) -> list[str]:
    """Each text cut to about `budget` tokens as the official encoder does (by whole words, counts capped
    at `max_length`); a text that whole words cannot trim (no whitespace: CJK, URLs, code) keeps its first
    `budget` tokens instead of becoming empty."""
    counts = token_counts(tokenizer, texts, max_length)
    return [
        text if count <= budget else _trim(tokenizer, text, count, budget, max_length)
        for text, count in zip(texts, counts)
    ]


def _trim(tokenizer: Any, text: str, count: int, budget: int, max_length: int) -> str:
    while count > budget:
        words = text.split()
        keep = int(len(words) * budget / count)
        if keep == 0:  # the official loop would return "" here
            return _first_tokens(tokenizer, text, budget, max_length)
        text = " ".join(words[:keep])
        count = token_counts(tokenizer, [text], max_length)[0]
    return text


def _first_tokens(tokenizer: Any, text: str, budget: int, max_length: int) -> str:
    """The longest prefix of `text` ending at a token boundary that counts at most `budget` tokens."""
    keep = budget
    while keep > 0:
        prefix = _token_prefix(tokenizer, text, keep)
        excess = token_counts(tokenizer, [prefix], max_length)[0] - budget
        if excess <= 0:
            return prefix
        keep -= excess  # re-tokenizing a cut can merge or split tokens at its end
    return ""


def _token_prefix(tokenizer: Any, text: str, tokens: int) -> str:
    """The text of the first `tokens` tokens of `text`: a slice of it where the tokenizer reports offsets."""
    if not getattr(tokenizer, "is_fast", False):
        ids = _tokenize(tokenizer, text, add_special_tokens=False)["input_ids"][:tokens]
        return tokenizer.decode(ids)
    offsets = _tokenize(tokenizer, text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    offsets = offsets[:tokens]
    return text[: offsets[-1][1]] if offsets else ""
