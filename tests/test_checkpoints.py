"""Released LLM2Vec checkpoint layouts (``-mntp`` + a second adapter), exact save/reload, loading errors, the CLI.

The layouts are local replicas built from a tiny Llama (tests/checkpoint_layouts.py); parity of their
numbers with the official llm2vec 0.2.3 is in tests/test_encoder_parity.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_layouts import write_adapter, write_mntp_repository
from peft import PeftModel

from llm2vec_fast.encoder import LLM2Vec
from llm2vec_fast.hf import enable_bidirectional
from llm2vec_fast.tiny import build_tiny_model

HUB_BASE = "meta-llama/Meta-Llama-3-8B-Instruct"  # selects the Llama 3 chat template
PAIRS = [["Retrieve documents that answer the question:", "What is the capital of France?"], ["", "Paris is big."]]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> Path:
    """``base/`` (a checkpoint), ``mntp/`` (the released -mntp layout on it), ``supervised/`` (adapter only,
    naming the raw base as the released ones do), ``mntp_output/`` (our MNTP output: adapter and tokenizer)."""
    root = tmp_path_factory.mktemp("checkpoints")
    model, tokenizer = build_tiny_model("llama", seed=5)
    model.model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    write_mntp_repository(root / "mntp", root / "base", HUB_BASE, str(root / "base"), seed=11)
    write_adapter(root / "supervised", root / "base", str(root / "base"), seed=12)
    write_adapter(root / "mntp_output", root / "base", str(root / "base"), seed=13)
    tokenizer.save_pretrained(root / "mntp_output")
    return root


def _encode(encoder: LLM2Vec) -> torch.Tensor:
    return encoder.encode(PAIRS, show_progress_bar=False)


def _by_hand(root: Path, second_adapter: str | None = None) -> LLM2Vec:
    """The official recipe spelled out: base weights, MNTP adapter merged, MNTP config's name, second adapter."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(root / "base")
    model = PeftModel.from_pretrained(model, root / "mntp").merge_and_unload()
    model.config._name_or_path = HUB_BASE
    if second_adapter is not None:
        model = PeftModel.from_pretrained(model, root / second_adapter)
    tokenizer = AutoTokenizer.from_pretrained(root / "mntp")
    tokenizer.pad_token = tokenizer.eos_token
    return LLM2Vec(enable_bidirectional(model), tokenizer)


def test_released_mntp_layout_loads_as_the_official_does(layouts: Path) -> None:
    mntp = LLM2Vec.from_pretrained(str(layouts / "mntp"))
    assert mntp.model.config._name_or_path == HUB_BASE
    assert mntp.prepare_for_tokenization("hi").startswith("<|start_header_id|>user")
    supervised = LLM2Vec.from_pretrained(str(layouts / "mntp"), peft_model_name_or_path=str(layouts / "supervised"))
    merged = LLM2Vec.from_pretrained(
        str(layouts / "mntp"), peft_model_name_or_path=str(layouts / "supervised"), merge_peft=True
    )
    torch.testing.assert_close(_encode(mntp), _encode(_by_hand(layouts)), rtol=0, atol=1e-6)
    torch.testing.assert_close(_encode(supervised), _encode(_by_hand(layouts, "supervised")), rtol=0, atol=1e-6)
    torch.testing.assert_close(_encode(merged), _encode(supervised), rtol=1e-5, atol=1e-6)
    raw = _encode(LLM2Vec.from_pretrained(str(layouts / "base")))
    assert (_encode(mntp) - raw).abs().max() > 1e-2 and (_encode(supervised) - _encode(mntp)).abs().max() > 1e-2


@pytest.mark.parametrize("paths", ["absolute", "relative"])
@pytest.mark.parametrize("merge_before_save", [False, True])
@pytest.mark.parametrize(
    "source", ["plain", "plain+adapter", "mntp", "mntp+adapter", "mntp_output", "mntp_output+adapter"]
)
def test_save_reloads_identical_embeddings(
    layouts: Path, tmp_path: Path, monkeypatch, source: str, merge_before_save: bool, paths: str
) -> None:
    monkeypatch.chdir(layouts)
    base = {"plain": "base", "mntp": "mntp", "mntp_output": "mntp_output"}[source.split("+")[0]]
    adapter = "supervised" if source.endswith("+adapter") else None
    if paths == "absolute":
        base, adapter = str(layouts / base), adapter and str(layouts / adapter)
    saved = os.path.relpath(tmp_path / "saved") if paths == "relative" else str(tmp_path / "saved")
    encoder = LLM2Vec.from_pretrained(base, peft_model_name_or_path=adapter, pooling_mode="weighted_mean")
    before = _encode(encoder)
    encoder.save(saved, merge_before_save=merge_before_save)
    after = _encode(encoder)  # merge_before_save merges the encoder itself
    monkeypatch.chdir(tmp_path)  # what the saved files name must not depend on where they were written from
    reloaded = LLM2Vec.from_pretrained(str(tmp_path / "saved"))
    assert reloaded.pooling_mode == "weighted_mean"
    assert torch.equal(_encode(reloaded), after)
    if adapter is not None and not merge_before_save:  # the official way to reload a saved adapter, too
        assert isinstance(reloaded.model, PeftModel)
        stacked = LLM2Vec.from_pretrained(str(layouts / base), peft_model_name_or_path=str(tmp_path / "saved"))
        assert torch.equal(_encode(stacked), before)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_adapter_base_recorded_relative_to_the_adapter_directory(layouts: Path, tmp_path: Path, monkeypatch) -> None:
    """An MNTP output whose adapter config names its base relative to where it lives loads from anywhere."""
    write_adapter(layouts / "relative_mntp", layouts / "base", "../base", seed=11)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (layouts / "relative_mntp" / name).write_bytes((layouts / "mntp_output" / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    encoder = LLM2Vec.from_pretrained(str(layouts / "relative_mntp"))
    official = LLM2Vec.from_pretrained(str(layouts / "base"), peft_model_name_or_path=str(layouts / "relative_mntp"))
    torch.testing.assert_close(_encode(encoder), _encode(official), rtol=1e-5, atol=1e-6)


def test_corrupt_files_are_named(layouts: Path, tmp_path: Path) -> None:
    LLM2Vec.from_pretrained(str(layouts / "base")).save(str(tmp_path / "saved"))
    config_file = tmp_path / "saved" / "llm2vec_config.json"
    config_file.write_text('{"pooling_mode": "mean",')
    with pytest.raises(ValueError, match=f"{config_file}: invalid JSON"):
        LLM2Vec.from_pretrained(str(tmp_path / "saved"))
    config_file.write_text(json.dumps({"pooling_mode": "mean"}))
    weights = tmp_path / "saved" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=f"{weights}: corrupt or truncated safetensors file"):
        LLM2Vec.from_pretrained(str(tmp_path / "saved"))


@pytest.mark.parametrize(
    "path", ["/no/such/model", "./no-such-model", "../no-such-model", "~/no-such-model", "existing/no-such-model"]
)
def test_missing_local_path_is_not_looked_up_on_the_hub(tmp_path: Path, monkeypatch, path: str) -> None:
    import huggingface_hub
    import transformers.utils.hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a local-looking path was looked up on the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    with pytest.raises(FileNotFoundError, match="model path .*no-such-model does not exist|/no/such/model"):
        LLM2Vec.from_pretrained(path)


def test_bad_attention_backend_is_refused_before_loading(layouts: Path) -> None:
    with pytest.raises(TypeError, match="attention_backend must be a backend name or None, got int"):
        LLM2Vec.from_pretrained(str(layouts / "base"), attention_backend=3)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        LLM2Vec.from_pretrained(str(layouts / "base"), attention_backend="flash")


@pytest.mark.parametrize("model", ["mntp_output", "mntp"])
def test_encode_command_takes_an_mntp_directory_and_a_second_adapter(layouts: Path, tmp_path: Path, capsys, model: str):
    from llm2vec_fast.cli import main

    source = tmp_path / "texts.txt"
    source.write_text("A man is playing a guitar.\nParis is the capital of France.\n")
    target = tmp_path / "out.npy"
    argv = ["encode", str(layouts / model), str(source), str(target), "--peft", str(layouts / "supervised")]
    assert main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    expected = LLM2Vec.from_pretrained(str(layouts / model), peft_model_name_or_path=str(layouts / "supervised"))
    lines = source.read_text().splitlines()
    np.testing.assert_allclose(
        np.load(target), expected.encode(lines, convert_to_numpy=True, show_progress_bar=False), rtol=1e-5, atol=1e-6
    )
    assert main(["encode", str(tmp_path), str(source), str(target), "--no-progress"]) == 2
    assert "config.json" in capsys.readouterr().err


def _hub_cache_repo(cache: Path, repo_id: str, source: Path, base: str | None = None) -> None:
    """`source`'s files as hub repository `repo_id` in a huggingface_hub cache; `base` rewrites the adapter's base."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for path in source.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    if base is not None:
        config = json.loads((snapshot / "adapter_config.json").read_text())
        (snapshot / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))


def test_hub_ids_as_in_the_official_readme(layouts: Path, tmp_path: Path, monkeypatch) -> None:
    """``from_pretrained("McGill-NLP/LLM2Vec-...-mntp", peft_model_name_or_path="...-mntp-supervised")`` on an
    offline hub cache holding replicas of the three repositories (base, -mntp, -supervised)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    mntp = "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp"
    supervised = f"{mntp}-supervised"
    _hub_cache_repo(cache, HUB_BASE, layouts / "base")
    _hub_cache_repo(cache, mntp, layouts / "mntp", base=HUB_BASE)
    _hub_cache_repo(cache, supervised, layouts / "supervised", base=HUB_BASE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    from_hub = LLM2Vec.from_pretrained(mntp, peft_model_name_or_path=supervised)
    assert from_hub.model.config._name_or_path == HUB_BASE
    local = LLM2Vec.from_pretrained(str(layouts / "mntp"), peft_model_name_or_path=str(layouts / "supervised"))
    assert torch.equal(_encode(from_hub), _encode(local))


@pytest.mark.parametrize("merge_before_save", [False, True])
def test_bfloat16_save_reloads_bitwise(layouts: Path, tmp_path: Path, merge_before_save: bool) -> None:
    """In bfloat16 merging an adapter moves the vectors by ~1e-2, so a kept adapter must reload kept."""
    encoder = LLM2Vec.from_pretrained(
        str(layouts / "mntp"), peft_model_name_or_path=str(layouts / "supervised"), dtype=torch.bfloat16
    )
    encoder.save(str(tmp_path / "saved"), merge_before_save=merge_before_save)
    reloaded = LLM2Vec.from_pretrained(str(tmp_path / "saved"), dtype=torch.bfloat16)
    assert torch.equal(_encode(reloaded), _encode(encoder))
