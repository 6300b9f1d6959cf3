"""Same numbers as the official llm2vec 0.2.3 on the same weights (committed oracle embeddings).

The fixtures were made by tests/data/llm2vec_oracle/make_oracle.py (see its docstring to rerun).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llm2vec_fast.encoder import LLM2Vec

ORACLE = Path(__file__).parent / "data" / "llm2vec_oracle"
CASES = json.loads((ORACLE / "cases.json").read_text())
FAMILIES = ("llama", "mistral")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_matches_official_llm2vec(family: str, case: dict) -> None:
    expected = load_file(str(ORACLE / family / "embeddings.safetensors"))[case["name"]]
    encoder = LLM2Vec.from_pretrained(str(ORACLE / family), **case["settings"])
    for batch_size in (1, 32):
        actual = encoder.encode(case["inputs"], batch_size=batch_size, show_progress_bar=False)
        assert actual.dtype == torch.float32 and actual.shape == expected.shape
        assert (actual - expected).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_cases_are_distinguishable(family: str) -> None:
    """The comparisons above could fail: settings that should change vectors do change the oracle's."""
    oracle = load_file(str(ORACLE / family / "embeddings.safetensors"))
    different = [
        ("pairs_mean", "pairs_mean_keep_instruction"),
        ("pairs_mean", "causal_mean"),
        ("plain_mean", "plain_weighted_mean"),
        ("plain_eos_token", "plain_last_token"),
        ("plain_mean", "plain_bos_token"),
    ]
    for first, second in different:
        assert (oracle[first] - oracle[second]).abs().max() > 1e-2, (first, second)
