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

from llm2vec_fast.chunk_store import ChunkStore
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
        "encode",
        str(MODEL),
        str(source),
        str(target),
        "--instruction",
        "Represent:",
        "--pooling",
        "weighted_mean",
        "--max-batch-tokens",
        "16",
        "--chunk-size",
        "2",
        "--dtype",
        "float32",
        "--no-progress",
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
        (lambda d: ("model", d / "in.txt", d / "o.csv"), r"must end in \.npy, \.safetensors or \.chunks"),
        (lambda d: ("model", d / "in.txt", d / "nowhere" / "o.npy"), "output directory .*nowhere does not exist"),
        (lambda d: ("model", d / "bad.jsonl", d / "o.npy"), r"bad.jsonl:2: invalid JSON"),
        (lambda d: ("model", d / "wrong.jsonl", d / "o.npy"), r"wrong.jsonl:1: expected a string"),
        (lambda d: (str(d / "no_model"), d / "in.txt", d / "o.npy"), "model path .*no_model does not exist"),
        (lambda d: (str(d), d / "in.txt", d / "o.npy"), "has no config.json"),
        (lambda d: ("model", d / "latin1.txt", d / "o.npy"), r"latin1.txt:2: not valid UTF-8"),
        (lambda d: ("model", d / "latin1.jsonl", d / "o.npy"), r"latin1.jsonl:2: not valid UTF-8"),
        (lambda d: ("model", d / "in.txt", d / "o.npy", "--batch-size", "0"), "--batch-size must be a positive"),
        (lambda d: ("model", d / "in.txt", d / "o.npy", "--chunk-size", "-2"), "--chunk-size must be a positive"),
        (lambda d: ("model", d / "in.txt", d / "o.npy", "--max-length", "0"), "--max-length must be a positive"),
        (lambda d: ("model", d / "in.txt", d / "o.npy", "--doc-max-length", "-1"), "--doc-max-length must be"),
        (lambda d: ("model", d / "in.txt", d / "o.npy", "--max-batch-tokens", "0"), "--max-batch-tokens must be"),
        (lambda d: ("model", d / "in.txt", d / "o.npy", "--device", "cuda:99"), "'cuda:99' requested but"),
        (lambda d: ("model", d / "in.txt", d / "o.npy", "--device", "tpu"), "invalid device 'tpu'"),
        (lambda d: ("model", d / "in.txt", d / "o.npy", "--device", "cpu", "--backend", "cuda"), "backend 'cuda'"),
    ],
)
def test_clear_errors(tmp_path: Path, capsys, setup, message: str) -> None:
    (tmp_path / "in.txt").write_text("hello\n")
    (tmp_path / "in.csv").write_text("hello\n")
    (tmp_path / "bad.jsonl").write_text('"ok"\n{not json\n')
    (tmp_path / "wrong.jsonl").write_text(json.dumps({"txt": "typo"}) + "\n")
    (tmp_path / "latin1.txt").write_bytes("fine\ncaf\u00e9\n".encode("latin-1"))
    (tmp_path / "latin1.jsonl").write_bytes('"fine"\n"caf\u00e9"\n'.encode("latin-1"))
    model, source, target, *options = setup(tmp_path)
    model = str(MODEL) if model == "model" else model
    assert _run("encode", model, str(source), str(target), *options) == 2
    error = capsys.readouterr().err
    assert error.startswith("llm2vec-fast encode: error: ")
    assert re.search(message, error), error
    assert not Path(target).exists()


def test_demo_prints_similarities_backend_and_speed(capsys) -> None:
    assert _run("demo", "--family", "mistral") == 0
    out = capsys.readouterr().out
    expected_backend = "cpu on cpu" if not torch.cuda.is_available() else r"\w+ on cuda"  # auto: the CPU fast path
    assert re.search(f"attention backend: {expected_backend}", out), out
    assert "cosine similarity:" in out and "tokens/s" in out
    matrix = [line.split()[1:6] for line in out.splitlines() if line.startswith("  ") and line.split()[0].isdigit()]
    values = torch.tensor([[float(v) for v in row] for row in matrix])
    assert values.shape == (5, 5)
    torch.testing.assert_close(values.diagonal(), torch.ones(5), atol=1e-3, rtol=0)
    torch.testing.assert_close(values, values.T)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_demo_refuses_a_missing_device_in_one_line(capsys) -> None:
    assert _run("demo", "--device", "cuda") == 2
    error = capsys.readouterr().err
    assert error.startswith("llm2vec-fast demo: error: ") and "no CUDA device" in error and len(error.splitlines()) == 1


def test_carriage_return_inside_a_line_stays_in_its_row(tmp_path: Path) -> None:
    texts = ["one\rline with a carriage return", "second line", "third\r"]
    source = tmp_path / "texts.txt"
    source.write_bytes(b"one\rline with a carriage return\r\nsecond line\nthird\r")  # CRLF, LF, no ending
    target = tmp_path / "out.npy"
    assert _run("encode", str(MODEL), str(source), str(target), "--no-progress") == 0
    expected = LLM2Vec.from_pretrained(str(MODEL)).encode(texts, show_progress_bar=False, convert_to_numpy=True)
    embeddings = np.load(target)
    assert embeddings.shape == (3, 64)
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-6)


def test_output_directory_is_refused_before_encoding(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "in.txt").write_text("hello\n")
    (tmp_path / "out.npy").mkdir()
    monkeypatch.setattr(LLM2Vec, "from_pretrained", lambda *a, **k: pytest.fail("the model must not load"))
    assert _run("encode", str(MODEL), str(tmp_path / "in.txt"), str(tmp_path / "out.npy")) == 2
    assert re.fullmatch(r"llm2vec-fast encode: error: output .*out.npy is a directory\n", capsys.readouterr().err)


def test_triton_backend_without_a_gpu_is_refused(tmp_path: Path, capsys, monkeypatch) -> None:
    from llm2vec_fast.kernels import backend as triton_backend

    monkeypatch.setattr(triton_backend, "INTERPRETING", False)  # as outside the tests: no CPU interpreter
    (tmp_path / "in.txt").write_text("hello\n")
    argv = ("encode", str(MODEL), str(tmp_path / "in.txt"), str(tmp_path / "o.npy"), "--device", "cpu")
    assert _run(*argv, "--backend", "triton") == 2
    assert re.fullmatch(r"llm2vec-fast encode: error: attention backend 'triton' .*\n", capsys.readouterr().err)


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_ctrl_c_keeps_the_finished_chunks_and_the_same_command_resumes(tmp_path: Path, capsys, suffix: str) -> None:
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(LINES) + "\n")
    target = tmp_path / f"out{suffix}"
    argv = ("encode", str(MODEL), str(source), str(target), "--chunk-size", "2", "--no-progress")
    calls = []
    original = ChunkStore.commit

    def commit(self, first, stop, block):
        calls.append(first)
        if calls == [0, 2]:  # Ctrl-C while the second chunk is being saved
            raise KeyboardInterrupt
        return original(self, first, stop, block)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ChunkStore, "commit", commit)
        assert _run(*argv) == 130
        chunks = tmp_path / f"out{suffix}.chunks"
        assert capsys.readouterr().err == (
            f"llm2vec-fast encode: interrupted after 2 of 4 texts; 1 of 2 chunks are kept in {chunks}: "
            "run the same command again to resume\n"
        )
        assert (
            not target.exists() and sorted(p.name for p in chunks.iterdir())[0] == "lines-000000000000-000000000002.npy"
        )
        assert _run(*argv) == 0
    assert calls == [0, 2, 2]  # the rerun encoded only the missing chunk
    assert capsys.readouterr().err == (
        f"llm2vec-fast encode: resuming: 1 of 2 chunks already in {chunks}\n"
        f"wrote 4 x 64 float32 embeddings to {target}\n"
    )
    embeddings = np.load(target) if suffix == ".npy" else load_file(str(target))["embeddings"]
    expected = LLM2Vec.from_pretrained(str(MODEL)).encode(LINES, show_progress_bar=False, convert_to_numpy=True)
    np.testing.assert_allclose(embeddings, expected, rtol=1e-5, atol=1e-6)
    assert sorted(tmp_path.iterdir()) == sorted([source, target])


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_an_empty_input_gives_an_empty_matrix(tmp_path: Path, suffix: str) -> None:
    source = tmp_path / "empty.txt"
    source.write_bytes(b"")
    target = tmp_path / f"out{suffix}"
    assert _run("encode", str(MODEL), str(source), str(target), "--no-progress") == 0
    embeddings = np.load(target) if suffix == ".npy" else load_file(str(target))["embeddings"]
    assert embeddings.shape == (0, 64) and embeddings.dtype == np.float32
    assert sorted(tmp_path.iterdir()) == sorted([source, target])


def test_ctrl_c_before_the_first_chunk_writes_nothing(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(ChunkStore, "commit", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(LINES) + "\n")
    assert _run("encode", str(MODEL), str(source), str(tmp_path / "out.npy"), "--no-progress") == 130
    assert capsys.readouterr().err == "llm2vec-fast encode: interrupted after 0 of 4 texts; nothing written\n"
    assert list(tmp_path.iterdir()) == [source]


def test_progress_bar_advances_per_batch_with_texts_and_tokens_per_second(tmp_path: Path, monkeypatch) -> None:
    import tqdm.auto

    bars = []

    class RecordingBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.shown, self.steps, self.postfixes = not self.disable, [], []
            bars.append(self)

        def update(self, n=1):
            self.steps.append(n)
            return super().update(n)

        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
            self.postfixes.append(dict(ordered_dict or {}, **kwargs))
            return super().set_postfix(ordered_dict, refresh, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(LINES + ["One more line.", "And the last one."]) + "\n")
    assert _run("encode", str(MODEL), str(source), str(tmp_path / "out.npy"), "--batch-size", "2") == 0
    (bar,) = [
        bar for bar in bars if bar.shown
    ]  # one chunk of 6 texts (the default chunk size is 4096): three forwards of 2
    assert bar.total == 6 and bar.steps == [2, 2, 2] and bar.n == 6
    assert all(set(postfix) == {"texts/s", "tokens/s"} for postfix in bar.postfixes) and len(bar.postfixes) == 3
