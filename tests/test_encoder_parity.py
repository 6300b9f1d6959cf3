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


CHECKPOINT_CASES = json.loads((ORACLE / "checkpoint_cases.json").read_text())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=[case["name"] for case in CHECKPOINT_CASES])
def test_released_layouts_match_official_llm2vec(family: str, case: dict, tmp_path: Path, monkeypatch) -> None:
    """``from_pretrained("<...>-mntp", peft_model_name_or_path="<...>-mntp-supervised")`` as the official README,
    on local replicas of the released layouts (their adapter configs name the base ``../<family>``)."""
    expected = load_file(str(ORACLE / "checkpoints.safetensors"))[f"{family}/{case['name']}"]
    monkeypatch.chdir(tmp_path)  # the base resolves beside the adapter directory, not against the working directory
    peft = case["peft"] and str(ORACLE / f"{family}_{case['peft']}")
    encoder = LLM2Vec.from_pretrained(str(ORACLE / f"{family}_mntp"), peft_model_name_or_path=peft, **case["settings"])
    actual = encoder.encode(case["inputs"], batch_size=2, show_progress_bar=False)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() < 1e-4


def test_released_layout_oracle_cases_are_distinguishable() -> None:
    """The adapters, the template and the chosen adapter all change the official vectors."""
    oracle = load_file(str(ORACLE / "checkpoints.safetensors"))
    plain = load_file(str(ORACLE / "llama" / "embeddings.safetensors"))
    assert (oracle["llama/mntp_mean"] - plain["plain_mean"]).abs().max() > 1e-2  # MNTP merged, template applied
    assert (oracle["llama/supervised_mean"] - oracle["mistral/supervised_mean"]).abs().max() > 1e-2
    assert (oracle["llama/simcse_weighted_mean"] - plain["plain_weighted_mean"]).abs().max() > 1e-2
