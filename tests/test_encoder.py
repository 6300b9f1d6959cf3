"""LLM2Vec encoder: invariances, formats, save/load, PEFT, streaming, one process per device, sentence-transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llm2vec_fast.encoder import LLM2Vec, plan_batches
from llm2vec_fast.hf import is_bidirectional
from llm2vec_fast.text import INSTRUCTION_SEPARATOR
from llm2vec_fast.tiny import build_tiny_model

ORACLE = Path(__file__).parent / "data" / "llm2vec_oracle"
TEXTS = [
    "A man is playing a guitar on the street.",
    "Paris",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.",
    "Padding tokens carry no information.",
    "",
    "Flash attention computes exact attention.",
]
PAIRS = [["Retrieve documents that answer the question:", "What is the capital of France?"], ["", "Paris"]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3 base model: a family the official llm2vec does not support."""
    directory = tmp_path_factory.mktemp("qwen3")
    model, tokenizer = build_tiny_model("qwen3", seed=3)
    model.model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _encode(encoder: LLM2Vec, inputs, **kwargs) -> torch.Tensor:
    return encoder.encode(inputs, show_progress_bar=False, **kwargs)


@pytest.mark.parametrize("pooling_mode", ["mean", "weighted_mean", "eos_token"])
def test_independent_of_batch_size_order_and_company(pooling_mode: str) -> None:
    encoder = LLM2Vec.from_pretrained(str(ORACLE / "llama"), pooling_mode=pooling_mode)
    reference = torch.stack([_encode(encoder, text) for text in TEXTS])  # each text alone
    permutation = [3, 0, 5, 1, 4, 2]
    runs = [
        _encode(encoder, TEXTS, batch_size=2),
        _encode(encoder, TEXTS, batch_size=64),
        _encode(encoder, TEXTS, max_batch_tokens=20, batch_size=64),
        _encode(encoder, [TEXTS[i] for i in permutation])[torch.tensor(permutation).argsort()],
        _encode(encoder, TEXTS + ["An unrelated much longer companion text " * 6])[: len(TEXTS)],
    ]
    for run in runs:
        torch.testing.assert_close(run, reference, rtol=1e-5, atol=1e-6)


def test_official_features_any_padding_side_match_encode() -> None:
    encoder = LLM2Vec.from_pretrained(str(ORACLE / "mistral"))
    prepared = encoder.prepare_texts([(instruction, text) for instruction, text in PAIRS] + [("", TEXTS[2])])
    expected = _encode(encoder, PAIRS + [TEXTS[2]])
    for side in ("left", "right"):
        encoder.tokenizer.padding_side = side
        features = encoder.tokenize(prepared)
        assert features["embed_mask"].sum() < features["attention_mask"].sum()  # the instruction is masked out
        with torch.no_grad():
            torch.testing.assert_close(encoder(features), expected, rtol=1e-5, atol=1e-6)


def test_output_formats_and_inputs(model_dir: Path) -> None:
    encoder = LLM2Vec.from_pretrained(str(model_dir))
    assert is_bidirectional(encoder.model)
    tensor = _encode(encoder, TEXTS)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (6, 64) and tensor.dtype == torch.float32
    assert torch.isfinite(tensor).all()
    array = _encode(encoder, TEXTS, convert_to_numpy=True)
    assert isinstance(array, np.ndarray) and array.dtype == np.float32
    np.testing.assert_allclose(array, tensor.numpy(), rtol=1e-5, atol=1e-6)
    assert isinstance(_encode(encoder, TEXTS, convert_to_numpy=True, convert_to_tensor=True), torch.Tensor)
    single = _encode(encoder, TEXTS[0])
    assert single.shape == (64,)
    torch.testing.assert_close(single, tensor[0], rtol=1e-5, atol=1e-6)
    assert _encode(encoder, []).shape == (0, 64)
    with_instruction = _encode(encoder, TEXTS[:2], instruction="Represent the sentence:")
    torch.testing.assert_close(with_instruction, _encode(encoder, [["Represent the sentence:", t] for t in TEXTS[:2]]))
    assert (with_instruction - tensor[:2]).abs().max() > 1e-3
    medi = _encode(encoder, ["Represent the sentence:", TEXTS[0], 7])
    torch.testing.assert_close(medi, with_instruction[:1], rtol=1e-5, atol=1e-6)
    mteb = encoder.encode(TEXTS[:2], task_name="STS12", prompt_type=None, show_progress_bar=False)
    torch.testing.assert_close(mteb, tensor[:2], rtol=1e-5, atol=1e-6)
    assert encoder.token_lengths(TEXTS[:2]) == [len(encoder.tokenizer(t)["input_ids"]) for t in TEXTS[:2]]


def test_bad_arguments(model_dir: Path) -> None:
    encoder = LLM2Vec.from_pretrained(str(model_dir))
    with pytest.raises(TypeError, match="unexpected keyword arguments: normalize"):
        encoder.encode(TEXTS, normalize=True)
    with pytest.raises(TypeError, match="sentence 1 must be a string or an \\[instruction, text\\] pair"):
        encoder.encode(["fine", 3])
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        encoder.encode(TEXTS, batch_size=0)
    with pytest.raises(ValueError, match="unknown pooling mode"):
        LLM2Vec.from_pretrained(str(model_dir), pooling_mode="max")
    with pytest.raises(ValueError, match="attn_implementation"):
        LLM2Vec.from_pretrained(str(model_dir), attn_implementation="sdpa")
    with pytest.raises(OSError):
        LLM2Vec.from_pretrained(str(model_dir / "missing"))


def test_plan_batches_respects_both_limits() -> None:
    lengths = [5, 50, 7, 3, 40, 8]
    batches = plan_batches(lengths, batch_size=3, max_batch_tokens=60)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len(b) <= 3 for b in batches)
    assert all(sum(lengths[i] for i in b) <= 60 or len(b) == 1 for b in batches)
    assert batches[0] == [1]  # 50 + 40 would exceed the budget
    assert plan_batches([100], batch_size=4, max_batch_tokens=10) == [[0]]


def test_save_reload_and_causal_option(model_dir: Path, tmp_path: Path) -> None:
    encoder = LLM2Vec.from_pretrained(str(model_dir), pooling_mode="weighted_mean", max_length=64)
    expected = _encode(encoder, PAIRS)
    encoder.save(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "llm2vec_config.json").read_text())
    assert saved == {"pooling_mode": "weighted_mean", "max_length": 64, "doc_max_length": 400, "skip_instruction": True}
    reloaded = LLM2Vec.from_pretrained(str(tmp_path / "saved"))
    assert reloaded.pooling_mode == "weighted_mean" and reloaded.max_length == 64
    torch.testing.assert_close(_encode(reloaded, PAIRS), expected, rtol=1e-6, atol=1e-7)
    overridden = LLM2Vec.from_pretrained(str(tmp_path / "saved"), pooling_mode="mean")
    assert overridden.pooling_mode == "mean"
    causal = LLM2Vec.from_pretrained(str(model_dir), pooling_mode="weighted_mean", enable_bidirectional=False)
    assert not is_bidirectional(causal.model)
    assert (_encode(causal, PAIRS) - expected).abs().max() > 1e-3


def test_peft_adapter_loaded_merged_or_separate(model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModel

    base = AutoModel.from_pretrained(model_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    plain = _encode(LLM2Vec.from_pretrained(str(model_dir)), TEXTS)
    separate = LLM2Vec.from_pretrained(str(model_dir), peft_model_name_or_path=str(tmp_path / "adapter"))
    merged = LLM2Vec.from_pretrained(str(model_dir), peft_model_name_or_path=str(tmp_path / "adapter"), merge_peft=True)
    assert isinstance(separate.model, PeftModel) and not isinstance(merged.model, PeftModel)
    assert is_bidirectional(separate.model) and is_bidirectional(merged.model)
    with_adapter = _encode(separate, TEXTS)
    torch.testing.assert_close(_encode(merged, TEXTS), with_adapter, rtol=1e-4, atol=1e-5)
    assert (with_adapter - plain).abs().max() > 1e-3  # the adapter does something
    shutil.copytree(model_dir, tmp_path / "both")  # official special case: adapter saved next to the base config
    shutil.copytree(tmp_path / "adapter", tmp_path / "both", dirs_exist_ok=True)
    both = LLM2Vec.from_pretrained(str(tmp_path / "both"))
    torch.testing.assert_close(_encode(both, TEXTS), with_adapter, rtol=1e-4, atol=1e-5)
    separate.save(str(tmp_path / "merged_save"), merge_before_save=True)
    reloaded = LLM2Vec.from_pretrained(str(tmp_path / "merged_save"))
    torch.testing.assert_close(_encode(reloaded, TEXTS), with_adapter, rtol=1e-4, atol=1e-5)


def test_stream_and_one_process_per_device(model_dir: Path) -> None:
    encoder = LLM2Vec.from_pretrained(str(model_dir))
    inputs = TEXTS * 3 + PAIRS
    expected = _encode(encoder, inputs)
    blocks = list(encoder.encode_stream(iter(inputs), chunk_size=4))
    assert [len(b) for b in blocks] == [4, 4, 4, 4, 4]
    torch.testing.assert_close(torch.cat(blocks), expected, rtol=1e-5, atol=1e-6)
    multi = _encode(encoder, inputs, device=["cpu", "cpu"])  # one spawned process per device
    torch.testing.assert_close(multi, expected, rtol=1e-5, atol=1e-6)


def test_sentence_transformers_gives_the_same_vectors(model_dir: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from llm2vec_fast.sentence_transformers import to_sentence_transformer

    encoder = LLM2Vec.from_pretrained(str(model_dir), pooling_mode="mean")
    model = to_sentence_transformer(encoder)
    assert getattr(model, "get_embedding_dimension", model.get_sentence_embedding_dimension)() == 64
    features = model[0].preprocess(TEXTS)
    assert features["input_ids"].shape == (1, sum(encoder.token_lengths(TEXTS)))  # packed: no padding built
    with pytest.raises(ValueError, match="max_seq_length must be a positive int, got 0"):
        model[0].max_seq_length = 0
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.encode(TEXTS, convert_to_tensor=True), _encode(encoder, TEXTS), **close)
    instruction = "Retrieve documents:"
    expected = _encode(encoder, TEXTS[:3], instruction=instruction)
    torch.testing.assert_close(model.encode(TEXTS[:3], prompt=instruction, convert_to_tensor=True), expected, **close)
    model.save(str(tmp_path / "st"))
    reloaded = SentenceTransformer(str(tmp_path / "st"), trust_remote_code=True)
    again = reloaded.encode(TEXTS[:3], prompt=instruction, convert_to_tensor=True)
    torch.testing.assert_close(again, expected, **close)


@pytest.fixture(scope="module")
def dropout_adapter(model_dir: Path, tmp_path_factory) -> Path:
    """A LoRA adapter with dropout on every projection it touches (so train mode changes the outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    directory = tmp_path_factory.mktemp("dropout_adapter")
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModel.from_pretrained(model_dir), lora).save_pretrained(directory)
    return directory


def test_encode_ignores_and_keeps_the_callers_mode(model_dir: Path, dropout_adapter: Path) -> None:
    encoder = LLM2Vec.from_pretrained(str(model_dir), peft_model_name_or_path=str(dropout_adapter))
    encoder.eval()
    expected = _encode(encoder, TEXTS)
    fresh = LLM2Vec.from_pretrained(str(model_dir), peft_model_name_or_path=str(dropout_adapter))
    assert torch.equal(_encode(fresh, TEXTS), expected)
    assert not any(module.training for module in fresh.model.modules())  # encode left the model as loaded
    encoder.train()
    assert torch.equal(_encode(encoder, TEXTS), expected)  # no dropout while encoding, whatever the mode
    assert all(module.training for module in encoder.modules())  # and the caller's mode is kept
    torch.manual_seed(0)
    features = encoder.tokenize(encoder.prepare_texts([("", t) for t in TEXTS[:2]]))
    assert (encoder(features) - expected[:2]).abs().max() > 1e-4  # training forward still uses dropout


def test_encode_in_train_mode_ignores_attention_dropout(model_dir: Path) -> None:
    encoder = LLM2Vec.from_pretrained(str(model_dir))
    expected = _encode(encoder, TEXTS)
    encoder.model.config.attention_dropout = 0.1  # HF hands it to the attention function in train mode
    for layer in encoder.model.modules():
        if hasattr(layer, "attention_dropout"):
            layer.attention_dropout = 0.1
    encoder.train()
    assert torch.equal(_encode(encoder, TEXTS), expected)
    features = encoder.tokenize(encoder.prepare_texts([("", t) for t in TEXTS[:2]]))
    with pytest.raises(ValueError, match="attention dropout"):  # a training forward still refuses it
        encoder(features)


def test_concurrent_encode_calls_match_sequential(model_dir: Path, dropout_adapter: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    encoder = LLM2Vec.from_pretrained(
        str(model_dir), peft_model_name_or_path=str(dropout_adapter), max_length=24, doc_max_length=12
    )
    no_spaces = ["x/" * 40, "\u4e2d\u6587" * 20]  # trimmed by tokens: tokenizer calls with other settings
    workloads = [TEXTS[i:] + PAIRS[: i % 2 + 1] + no_spaces[: i % 3] for i in range(4)]
    sequential = [_encode(encoder, inputs, batch_size=1) for inputs in workloads]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(5):
            concurrent = list(pool.map(lambda inputs: _encode(encoder, inputs, batch_size=1), workloads))
            for got, want in zip(concurrent, sequential):
                assert torch.equal(got, want)


def test_text_containing_the_separator_keeps_its_instruction_boundary() -> None:
    encoder = LLM2Vec.from_pretrained(str(ORACLE / "mistral"))
    tokenizer = encoder.tokenizer
    clean = ("Find similar:", "left right")
    tricky = ("Find similar:", f"left {INSTRUCTION_SEPARATOR} right")
    ids, lengths = encoder.tokenize_pairs([clean, tricky, ("", tricky[1])])
    assert ids[1] == tokenizer(f"Find similar: {tricky[1]}")["input_ids"]  # the text keeps its characters
    assert ids[2] == tokenizer(tricky[1])["input_ids"]
    assert lengths[1] == lengths[0] and lengths[2] == 1  # instruction (or BOS alone) still ends where it did
    assert encoder.prepare_texts([tricky])[0] == f"Find similar: {INSTRUCTION_SEPARATOR}{tricky[1]}"  # official form


def test_text_without_whitespace_is_trimmed_by_tokens() -> None:
    encoder = LLM2Vec.from_pretrained(str(ORACLE / "llama"), doc_max_length=6)
    tokenizer = encoder.tokenizer
    texts = ["https://example.com/" + "abcdefgh" * 12, "\u4e2d\u6587\u6587\u672c" * 10, "a"]
    prepared = encoder.prepare_texts([("", text) for text in texts])
    for text, string in zip(texts, prepared):
        kept = string.removeprefix(INSTRUCTION_SEPARATOR)
        assert kept and text.startswith(kept)
        assert 0 < len(tokenizer(kept, add_special_tokens=False)["input_ids"]) <= 6
    assert len(tokenizer(prepared[0].removeprefix(INSTRUCTION_SEPARATOR), add_special_tokens=False)["input_ids"]) == 6
    assert prepared[2] == INSTRUCTION_SEPARATOR + "a"
    embeddings = _encode(encoder, texts[:2] + [""])
    assert (embeddings[:2] - embeddings[2]).abs().amax(-1).min() > 1e-3  # not embedded as the empty string


def test_settings_are_checked_at_construction(model_dir: Path) -> None:
    encoder = LLM2Vec.from_pretrained(str(model_dir))
    for name, value in [("max_length", 0), ("max_length", -3), ("doc_max_length", 0), ("max_length", 2.5)]:
        with pytest.raises(ValueError, match=f"{name} must be a positive int, got {value}"):
            LLM2Vec(encoder.model, encoder.tokenizer, **{name: value})
    with pytest.raises(TypeError, match="skip_instruction must be a bool"):
        LLM2Vec(encoder.model, encoder.tokenizer, skip_instruction="no")
    with pytest.raises(TypeError, match="instruction must be a string or None, got int"):
        encoder.encode(TEXTS, instruction=123)


def test_stream_and_pool_settings_are_checked_before_any_input_is_read(model_dir: Path) -> None:
    from llm2vec_fast.encode_pool import EncodePool

    encoder = LLM2Vec.from_pretrained(str(model_dir))

    def unread():
        pytest.fail("the input must not be read")
        yield "text"

    cases = [
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int, got 0"),
        ({"batch_size": -1}, ValueError, "batch_size must be a positive int"),
        ({"max_batch_tokens": 0}, ValueError, "max_batch_tokens must be a positive int or None"),
        ({"instruction": 5}, TypeError, "instruction must be a string or None, got int"),
        ({"device": "cuda:99"}, ValueError, "'cuda:99' requested but"),
        ({"devices": ["cpu", "cuda:99"]}, ValueError, "'cuda:99' requested but"),
    ]
    for settings, error, message in cases:
        with pytest.raises(error, match=message):
            encoder.encode_stream(unread(), **settings)
    with pytest.raises(ValueError, match="'cuda:99' requested but"):
        EncodePool(encoder, ["cuda:99"])
    with pytest.raises(ValueError, match="'cuda:99' requested but"):
        encoder.encode(TEXTS, device="cuda:99")
