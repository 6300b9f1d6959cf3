"""Text preparation (``llm2vec_fast.text``): instruction boundary, official trimming, thread-safe tokenizer calls."""

from __future__ import annotations

import threading

import pytest

from llm2vec_fast.text import (
    CHAT_TEMPLATES,
    INSTRUCTION_SEPARATOR,
    prepare_for_tokenization,
    split_at_instruction,
    split_prepared,
    token_counts,
    tokenize_with_instruction,
    trim_to_tokens,
)
from llm2vec_fast.tiny import build_tokenizer

SEP = INSTRUCTION_SEPARATOR


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _official_trim(tokenizer, text: str, budget: int, max_length: int) -> str:
    """The official llm2vec 0.2.3 loop (``LLM2Vec._convert_to_str``)."""
    length = token_counts(tokenizer, [text], max_length)[0]
    while length > budget:
        words = text.split()
        text = " ".join(words[: int(len(words) * budget / length)])
        length = token_counts(tokenizer, [text], max_length)[0]
    return text


def test_split_at_instruction_keeps_separators_inside_the_parts() -> None:
    template = CHAT_TEMPLATES["mistralai/Mistral-7B-Instruct-v0.2"]

    def wrap(string: str) -> str:
        return template.format(string.strip())

    assert split_at_instruction("Find: ", "plain", wrap) == ("[INST] Find: ", "plain [/INST]")
    head, tail = f"Say {SEP}: ", f"a{SEP}b "
    assert split_at_instruction(head, tail, wrap) == (f"[INST] {head}", f"a{SEP}b [/INST]")
    marker_like = "\ue000\ue001"  # the parts may even hold the private-use characters the cut is made with
    assert split_at_instruction(marker_like, marker_like, lambda s: s) == (marker_like, marker_like)
    assert split_prepared(f"Find: {SEP}a{SEP}b") == ("Find: ", f"a{SEP}b")
    assert split_prepared("no separator") == ("no separator", "")


def test_prepare_for_tokenization_eos_and_templates() -> None:
    plain = {"model_name": "local", "model_type": "llama"}
    assert prepare_for_tokenization(" text ", **plain, eos_token=None) == " text "
    assert prepare_for_tokenization(" text ", **plain, eos_token="</s>") == "text </s>"
    assert prepare_for_tokenization("t", model_name="x", model_type="unknown", eos_token="<end>") == "t<end>"
    llama3 = "meta-llama/Meta-Llama-3-8B-Instruct"
    assert prepare_for_tokenization(" t", model_name=llama3, model_type="llama", eos_token="</s>") == (
        CHAT_TEMPLATES[llama3].format("t")
    )


def test_tokenize_with_instruction_counts_the_head(tokenizer) -> None:
    prepared = [("Find similar: ", "a short text"), ("", "just text"), ("all head", "")]
    ids, lengths = tokenize_with_instruction(tokenizer, prepared, max_length=None)
    assert ids == [tokenizer(h + t)["input_ids"] for h, t in prepared]
    tails = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for _, t in prepared]
    assert lengths == [len(row) - tail for row, tail in zip(ids, tails)]
    assert lengths[1] == 1 and lengths[2] == len(ids[2])  # BOS only; everything
    truncated, _ = tokenize_with_instruction(tokenizer, prepared, max_length=4)
    assert all(len(row) <= 4 for row in truncated)


def test_trim_keeps_the_official_result_where_words_reach_the_budget(tokenizer) -> None:
    texts = [
        "Contrastive learning pulls paired sentences together and pushes others apart. " * 5,
        "short text",
        "one two three four " + "x" * 20,  # a long last word: the official loop keeps the first ones
    ]
    for budget, max_length in [(12, 24), (7, 512), (30, 40)]:
        expected = [_official_trim(tokenizer, text, budget, max_length) for text in texts]
        assert trim_to_tokens(tokenizer, texts, budget, max_length) == expected
        assert all(expected)


@pytest.mark.parametrize("text", ["https://example.com/" + "path/" * 30, "\u4e2d\u6587\u6587\u672c" * 30, " " * 50])
def test_trim_by_tokens_where_words_cannot(tokenizer, text: str) -> None:
    assert _official_trim(tokenizer, text, 8, 512) == ""  # what the official encoder embeds
    trimmed = trim_to_tokens(tokenizer, [text], 8, 512)[0]
    assert trimmed and text.startswith(trimmed)
    assert 0 < token_counts(tokenizer, [trimmed], None)[0] <= 8
    longer = text[: len(trimmed) + 3]
    assert token_counts(tokenizer, [longer], None)[0] > 8 or longer == text  # the longest such prefix, about


def test_tokenizer_calls_with_different_truncation_from_threads(tokenizer) -> None:
    texts = ["the quick brown fox jumps over the lazy dog " * 10] * 16
    full = token_counts(tokenizer, texts[:1], None)[0]
    wrong = []

    def count(max_length: int | None, expected: int) -> None:
        for _ in range(30):
            if set(token_counts(tokenizer, texts, max_length)) != {expected}:
                wrong.append(max_length)

    threads = [threading.Thread(target=count, args=args) for args in [(5, 5), (None, full)] * 2]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong


def test_training_tokenization_keeps_a_separator_inside_the_text(tokenizer) -> None:
    from llm2vec_fast.training.data.sources import tokenize_for_embedding

    text = f"left {SEP} right"
    pairs = [("Find", "left right"), ("Find", text), ("", text), (f"Find {SEP}", "left right")]
    ids, lengths = tokenize_for_embedding(tokenizer, pairs, 64)
    assert ids[1] == tokenizer(f"Find; {text}")["input_ids"] and ids[2] == tokenizer(text)["input_ids"]
    assert lengths[1] == lengths[0] and lengths[2] == 1  # the instruction (or BOS alone) ends where it did
    assert ids[3] == tokenizer(f"Find {SEP}; left right")["input_ids"]
    assert len(ids[3]) - lengths[3] == len(ids[0]) - lengths[0]  # the same text tokens are pooled
