"""The families and presets added after the first six, through the encoder: saved and reloaded (tied embeddings
included), pooled like HF eager attention pools, and independent of batch size and company."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from llm2vec_fast.encoder import LLM2Vec
from llm2vec_fast.hf import is_bidirectional
from llm2vec_fast.tiny import PRESETS, build_tiny_model

ADDED = ("gemma3", "phi3", "granite", "olmo2", *PRESETS)
PAIRS = [
    ["Retrieve documents that answer the question:", "What is the capital of France?"],
    ["", "Paris"],
    ["", "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat."],
]


def test_presets_build_what_they_name() -> None:
    for name in ("llama3.2", "qwen2.5", "qwen3-tied"):
        model, _ = build_tiny_model(name)
        assert model.lm_head.weight is model.model.embed_tokens.weight, name
    assert model.config.model_type == "qwen3"
    llama, _ = build_tiny_model("llama3.2")
    assert llama.config.rope_parameters["rope_type"] == "llama3"
    gemma, _ = build_tiny_model("embeddinggemma")
    assert gemma.config.use_bidirectional_attention and gemma.config.layer_types[0] == "sliding_attention"


@pytest.mark.parametrize("family", ADDED)
def test_encoder_pools_like_eager_and_ignores_company(family: str, tmp_path: Path) -> None:
    model, tokenizer = build_tiny_model(family, seed=4)
    model.save_pretrained(tmp_path)  # the whole *ForCausalLM: tied presets reload their shared embedding
    tokenizer.save_pretrained(tmp_path)
    encoder = LLM2Vec.from_pretrained(str(tmp_path), pooling_mode="mean")
    assert is_bidirectional(encoder.model)
    assert torch.equal(encoder.model.embed_tokens.weight, model.model.embed_tokens.weight)

    features = encoder.tokenize(encoder.prepare_texts(PAIRS))
    reference = copy.deepcopy(model.model)
    reference.set_attn_implementation("eager")
    if not getattr(reference.config, "use_bidirectional_attention", False):  # EmbeddingGemma is, as loaded
        reference.config.is_causal = False
    with torch.no_grad():
        hidden = reference(input_ids=features["input_ids"], attention_mask=features["attention_mask"])[0]
    embed = features["embed_mask"].unsqueeze(-1).to(hidden.dtype)
    expected = (hidden * embed).sum(1) / embed.sum(1)

    together = encoder.encode(PAIRS, batch_size=8, show_progress_bar=False)
    alone = torch.cat([encoder.encode([pair], show_progress_bar=False) for pair in PAIRS])
    reversed_order = encoder.encode(PAIRS[::-1], batch_size=2, show_progress_bar=False).flip(0)
    error = (together - expected).abs().max() / expected.abs().max()
    assert error < 1e-5, f"relative error {error:.2e}"
    for run in (alone, reversed_order):
        torch.testing.assert_close(run, together, rtol=1e-5, atol=1e-6)
