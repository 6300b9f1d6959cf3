"""``llm2vec-fast encode`` and ``llm2vec-fast demo`` end to end on a tiny model directory."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from llm2vec_fast.demo import add_demo_command
from llm2vec_fast.encode_cli import add_encode_command
from llm2vec_fast.encoder import LLM2Vec

MODEL = Path(__file__).parent / "data" / "llm2vec_oracle" / "mistral"
LINES = ["A man is playing a guitar.", "", "Paris is the capital of France.", "The fox jumps."]


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="llm2vec-fast")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_encode_command(subparsers)
    add_demo_command(subparsers)
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_txt_to_npy(tmp_path: Path) -> None:
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(LINES) + "\n")
    target = tmp_path / "out.npy"
    assert _run("encode", str(MODEL), str(source), str(target), "--batch-size", "2", "--no-progress") == 0
    embeddings = np.load(target)
    expected = LLM2Vec.from_pretrained(str(MODEL)).encode(LINES, show_progress_bar=False, convert_to_numpy=True)
    assert embeddings.shape == (4, 64) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "out.npy.partial").exists()


def test_jsonl_to_safetensors_with_instructions(tmp_path: Path) -> None:
    rows = [
        '"plain string"',
        '{"text": "object text"}',
        "",
        '{"text": "query", "instruction": "Find answers:"}',
        '["Pair instruction:", "pair text"]',
    ]
    source = tmp_path / "inputs.jsonl"
    source.write_text("\n".join(rows) + "\n")
    target = tmp_path / "out.safetensors"
    code = _run(
        "encode", str(MODEL), str(source), str(target), "--instruction", "Represent:", "--pooling", "weighted_mean",
        "--max-batch-tokens", "16", "--chunk-size", "2", "--dtype", "float32", "--no-progress",
    )
    assert code == 0
    embeddings = load_file(str(target))["embeddings"]
    encoder = LLM2Vec.from_pretrained(str(MODEL), pooling_mode="weighted_mean")
    expected = encoder.encode(
        [
            ["Represent:", "plain string"],
            ["Represent:", "object text"],
            ["Find answers:", "query"],
            ["Pair instruction:", "pair text"],
        ],
        show_progress_bar=False,
    )
    np.testing.assert_allclose(embeddings, expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: ("model", d / "missing.txt", d / "o.npy"), "input file .*missing.txt does not exist"),
        (lambda d: ("model", d / "in.csv", d / "o.npy"), r"must end in \.txt or \.jsonl"),
        (lambda d: ("model", d / "in.txt", d / "o.csv"), r"must end in \.npy or \.safetensors"),
        (lambda d: ("model", d / "in.txt", d / "nowhere" / "o.npy"), "output directory .*nowhere does not exist"),
        (lambda d: ("model", d / "bad.jsonl", d / "o.npy"), r"bad.jsonl:2: invalid JSON"),
        (lambda d: ("model", d / "wrong.jsonl", d / "o.npy"), r"wrong.jsonl:1: expected a string"),
        (lambda d: (str(d / "no_model"), d / "in.txt", d / "o.npy"), "model path .*no_model does not exist"),
        (lambda d: (str(d), d / "in.txt", d / "o.npy"), "has no config.json"),
    ],
)
def test_clear_errors(tmp_path: Path, capsys, setup, message: str) -> None:
    (tmp_path / "in.txt").write_text("hello\n")
    (tmp_path / "in.csv").write_text("hello\n")
    (tmp_path / "bad.jsonl").write_text('"ok"\n{not json\n')
    (tmp_path / "wrong.jsonl").write_text(json.dumps({"txt": "typo"}) + "\n")
    model, source, target = setup(tmp_path)
    model = str(MODEL) if model == "model" else model
    assert _run("encode", model, str(source), str(target)) == 2
    error = capsys.readouterr().err
    assert error.startswith("llm2vec-fast encode: error: ")
    assert re.search(message, error), error
    assert not Path(target).exists()


def test_demo_prints_similarities_backend_and_speed(capsys) -> None:
    assert _run("demo", "--family", "mistral") == 0
    out = capsys.readouterr().out
    expected_backend = "reference on cpu" if not torch.cuda.is_available() else r"\w+ on cuda"
    assert re.search(f"attention backend: {expected_backend}", out), out
    assert "cosine similarity:" in out and "tokens/s" in out
    matrix = [line.split()[1:6] for line in out.splitlines() if line.startswith("  ") and line.split()[0].isdigit()]
    values = torch.tensor([[float(v) for v in row] for row in matrix])
    assert values.shape == (5, 5)
    torch.testing.assert_close(values.diagonal(), torch.ones(5), atol=1e-3, rtol=0)
    torch.testing.assert_close(values, values.T)
