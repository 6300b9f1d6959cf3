"""Corpus-scale encoding: chunks committed atomically, resumed after a kill -9 on another number of processes,
damaged chunks found and redone, other settings refused, and the merge checking every line and checksum.

Processes are launched with torchrun (gloo, CPU) on the tiny model of test_encode_cli. The merged matrix is
compared with one process's ``LLM2Vec.encode`` to fp32 rounding: chunks are planned into batches apart from
the whole list, and a matmul's rounding may depend on how many rows it has (here it comes out bitwise equal).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from llm2vec_fast import chunk_store
from llm2vec_fast.chunk_store import ChunkStore, StoreError, merge
from llm2vec_fast.encode_cli import add_encode_command
from llm2vec_fast.encoder import LLM2Vec

MODEL = Path(__file__).parent / "data" / "llm2vec_oracle" / "mistral"
WORDS = "a man is playing guitar Paris capital of France the quick brown fox jumps over lazy dog".split()
CHUNK = 8

# Runs the encode command in a launched process, logging each chunk it commits; KILL_RANK kills itself with
# SIGKILL right after its KILL_AFTER-th commit (nothing after that runs: no cleanup, no flush).
WORKER = """
import os, signal, sys
from llm2vec_fast import chunk_store, encode_cli

original = chunk_store.ChunkStore.commit
commits = []

def logged_commit(self, first, stop, block):
    record = original(self, first, stop, block)
    commits.append(first)
    with open(os.environ["COMMIT_LOG"], "a") as log:
        log.write(f"{os.environ['RANK']} {first}\\n")
    if os.environ["RANK"] == os.environ.get("KILL_RANK") and len(commits) == int(os.environ["KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return record

chunk_store.ChunkStore.commit = logged_commit
sys.exit(encode_cli.main(sys.argv[1:]))
"""


def _texts(count: int, seed: int) -> list[str]:
    generator = random.Random(seed)
    return [" ".join(generator.choices(WORDS, k=generator.randint(0, 14))) for _ in range(count)]


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="llm2vec-fast")
    add_encode_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["encode", *argv])
    return args.func(args)


def _expected(texts: list[str], **settings) -> np.ndarray:
    return LLM2Vec.from_pretrained(str(MODEL), **settings).encode(texts, show_progress_bar=False, convert_to_numpy=True)


def _assert_fp32_equal(embeddings: np.ndarray, expected: np.ndarray) -> None:
    assert embeddings.shape == expected.shape and np.isfinite(embeddings).all()
    assert np.linalg.norm(embeddings - expected) <= 1e-6 * np.linalg.norm(expected)


def _launch(
    tmp_path: Path, processes: int, argv: list[str], log: Path, **environment: str
) -> subprocess.CompletedProcess:
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COMMIT_LOG": str(log), **environment}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    command += [str(tmp_path / "worker.py"), *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _records(directory: Path) -> dict[int, int]:
    """First line of each committed chunk -> how many manifest records it has."""
    counts: dict[int, int] = {}
    for manifest in directory.glob("manifest-*.jsonl"):
        for line in manifest.read_text().split("\n")[1:-1]:  # a line cut short by the kill is no record
            first = json.loads(line)["first"]
            counts[first] = counts.get(first, 0) + 1
    return counts


def _commit_until(stop_line: int):
    """``ChunkStore.commit`` as it is, but Ctrl-C when the chunk starting at `stop_line` is about to be saved."""
    original = ChunkStore.commit

    def commit(self, first, stop, block):
        if first == stop_line:
            raise KeyboardInterrupt
        return original(self, first, stop, block)

    return commit


def _logged(log: Path) -> list[int]:
    return [int(line.split()[1]) for line in log.read_text().splitlines()] if log.exists() else []


def test_rank_killed_mid_run_resumes_on_three_processes_and_merges_what_one_process_computes(tmp_path: Path) -> None:
    texts = _texts(200, seed=1)
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(texts) + "\n")
    target = tmp_path / "embeddings.npy"
    chunks = tmp_path / "embeddings.npy.chunks"
    argv = [str(MODEL), str(source), str(target), "--chunk-size", str(CHUNK), "--batch-size", "4", "--no-progress"]

    killed = _launch(tmp_path, 2, argv, tmp_path / "first.log", KILL_RANK="1", KILL_AFTER="3")
    assert killed.returncode != 0 and "exitcode  : -9" in killed.stderr, killed.stderr[-2000:]
    assert "[rank0]: Traceback" not in killed.stderr  # if rank 0 reached the final barrier: one line, no traceback
    assert not target.exists()
    committed = _records(chunks)
    all_chunks = set(range(0, len(texts), CHUNK))
    assert 3 <= len(committed) < len(all_chunks) and all(count == 1 for count in committed.values())
    assert sum(1 for first in committed if first // CHUNK % 2 == 1) == 3  # rank 1's commits, then its kill

    resumed = _launch(tmp_path, 3, argv, tmp_path / "second.log")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    recomputed = _logged(tmp_path / "second.log")
    assert sorted(recomputed) == sorted(all_chunks - set(committed))  # only the missing chunks, each once
    assert re.search(r"rank \d: resuming: \d+ of \d+ chunks already in ", resumed.stderr)
    assert f"wrote {len(texts)} x 64 float32 embeddings to {target}" in resumed.stderr
    assert not chunks.exists()  # merged, then removed
    _assert_fp32_equal(np.load(target), _expected(texts))


def test_chunks_output_merges_once_complete_and_a_damaged_chunk_is_refused_then_recomputed(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    rows = ['"plain"', "", '["Find:", "a pair"]', '{"text": "object", "instruction": "Say:"}'] * 6  # 24 lines
    items = [json.loads(row) for row in rows if row]
    items = [[item["instruction"], item["text"]] if isinstance(item, dict) else item for item in items]
    source = tmp_path / "corpus.jsonl"
    source.write_text("\n".join(rows) + "\n")
    chunks = tmp_path / "out.chunks"
    argv = [str(MODEL), str(source), str(chunks), "--chunk-size", "5", "--instruction", "Represent:", "--no-progress"]
    assert _run(*argv) == 0
    assert "holds all 5 chunks" in capsys.readouterr().err
    names = sorted(path.name for path in chunks.glob("lines-*.npy"))
    assert names[0] == "lines-000000000000-000000000005.npy" and names[-1] == "lines-000000000020-000000000024.npy"
    merged = tmp_path / "merged.safetensors"
    assert _run("--merge", str(chunks), str(merged)) == 0
    assert capsys.readouterr().err == f"wrote 18 x 64 float32 embeddings to {merged}\n"
    expected = _expected([["Represent:", item] if isinstance(item, str) else item for item in items])
    _assert_fp32_equal(load_file(str(merged))["embeddings"], expected)
    with safe_open(str(merged), "np") as saved:
        assert saved.metadata() == {"model": str(MODEL), "pooling_mode": "mean", "instruction": "Represent:"}

    damaged, truncated = chunks / names[1], chunks / names[3]
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0x40
    damaged.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:100])
    assert _run("--merge", str(chunks), str(tmp_path / "again.npy")) == 2
    error = capsys.readouterr().err
    assert re.fullmatch(
        rf"llm2vec-fast encode: error: chunk file .*{names[1]} is damaged \(checksum mismatch\)[^\n]*\n", error
    )
    assert not (tmp_path / "again.npy").exists()

    commits = []
    original = ChunkStore.commit
    monkeypatch.setattr(ChunkStore, "commit", lambda self, *a: commits.append(a[0]) or original(self, *a))
    assert _run(*argv) == 0
    assert sorted(commits) == [5, 15]
    error = capsys.readouterr().err
    assert error.count("is missing, truncated or damaged (checksum mismatch): encoding it again") == 2
    assert "resuming: 3 of 5 chunks already in" in error
    assert _run("--merge", str(chunks), str(tmp_path / "again.npy")) == 0
    _assert_fp32_equal(np.load(tmp_path / "again.npy"), expected)


@pytest.mark.parametrize(
    ("change", "difference"),
    [
        (["--pooling", "weighted_mean"], r"settings\.pooling_mode 'mean' there, 'weighted_mean' now"),
        (["--chunk-size", "4"], "chunk_lines 5 there, 4 now"),
        (["--instruction", "Other:"], "settings.instruction None there, 'Other:' now"),
        (["--peft", str(MODEL.parent / "mistral_supervised")], "model.weights_sha256 "),
        ("edit the input", "input.sha256 "),
    ],
)
def test_a_directory_made_with_other_settings_is_refused_in_one_line(
    tmp_path: Path, capsys, change, difference: str
) -> None:
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(_texts(12, seed=2)) + "\n")
    target = tmp_path / "out.npy"
    argv = [str(MODEL), str(source), str(target), "--chunk-size", "5", "--no-progress"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ChunkStore, "commit", _commit_until(5))
        assert _run(*argv) == 130
    capsys.readouterr()
    if change == "edit the input":
        source.write_text(source.read_text().replace("a", "b", 1))
        change = []
    assert _run(*argv, *change) == 2
    error = capsys.readouterr().err
    assert re.fullmatch(
        r"llm2vec-fast encode: error: .*out\.npy\.chunks was made with another input, model or "
        r"settings \(.*\): use another output or delete it\n",
        error,
    ), error
    assert re.search(difference if difference.startswith(("settings\\", "chunk")) else re.escape(difference), error)
    assert not target.exists()


def test_a_moved_input_and_another_batch_size_still_resume(tmp_path: Path, capsys, poisoned_outputs) -> None:
    texts = _texts(12, seed=4)  # torch.empty NaN-filled (poisoned_outputs): a row no batch writes would show
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(texts) + "\n")
    chunks = tmp_path / "out.chunks"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ChunkStore, "commit", _commit_until(5))
        assert _run(str(MODEL), str(source), str(chunks), "--chunk-size", "5", "--no-progress") == 130
    moved = source.rename(tmp_path / "moved.txt")
    assert _run(str(MODEL), str(moved), str(chunks), "--chunk-size", "5", "--batch-size", "3", "--no-progress") == 0
    assert "resuming: 1 of 3 chunks already in" in capsys.readouterr().err
    assert merge(chunks, tmp_path / "out.npy") == (12, 64)
    _assert_fp32_equal(np.load(tmp_path / "out.npy"), _expected(texts))


def test_merge_needs_every_line_exactly_once_and_a_cut_manifest_line_only_loses_its_chunk(tmp_path: Path) -> None:
    header = {
        "format": 1,
        "input": {"lines": 10},
        "chunk_lines": 4,
        "width": 3,
        "model": {"path": "m"},
        "settings": {"pooling_mode": "mean", "instruction": None},
    }
    blocks = [
        np.random.default_rng(seed).standard_normal((rows, 3)).astype(np.float32) for seed, rows in enumerate((4, 3, 2))
    ]
    store = ChunkStore(tmp_path / "d.chunks", header, rank=1, world_size=2)
    store.commit(0, 4, blocks[0])
    store.commit(8, 10, blocks[2])
    with pytest.raises(StoreError, match=r"incomplete: lines 4-8 of 10 are not encoded"):
        merge(tmp_path / "d.chunks", tmp_path / "m.npy")
    manifest = tmp_path / "d.chunks" / "manifest-w2-r1.jsonl"
    manifest.write_text(manifest.read_text() + '{"first": 4, "stop": 8, "fi')  # killed in the middle of a record
    reopened = ChunkStore(tmp_path / "d.chunks", header, rank=1, world_size=2)
    assert sorted(reopened.records) == [0, 8] and reopened.verified(0) and reopened.verified(8)
    reopened.commit(4, 8, blocks[1])
    assert all(line.endswith("}") for line in manifest.read_text().splitlines())
    assert merge(tmp_path / "d.chunks", tmp_path / "m.npy") == (9, 3)
    assert np.array_equal(np.load(tmp_path / "m.npy"), np.concatenate(blocks))

    other = ChunkStore(tmp_path / "d.chunks", {**header, "chunk_lines": 4}, rank=0, world_size=1)
    other.commit(5, 8, blocks[1])  # a chunk not on the 4-line grid
    with pytest.raises(StoreError, match="starting at line 5, not a multiple of 4"):
        merge(tmp_path / "d.chunks", tmp_path / "m2.npy")
    assert chunk_store.chunk_file_name(5, 8) == "lines-000000000005-000000000008.npy"


@pytest.mark.parametrize(
    ("environment", "argv", "message"),
    [
        (
            {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},
            [],
            "could not join the 2 launched processes: .*MASTER_ADDR",
        ),
        ({"WORLD_SIZE": "2", "RANK": "2"}, [], "RANK=2 and WORLD_SIZE=2 from the launcher are inconsistent"),
        ({"WORLD_SIZE": "two"}, [], "environment variable WORLD_SIZE must be an integer, got 'two'"),
        ({"LOCAL_RANK": "0"}, ["--device", "cpu,cpu"], "--device lists 2 devices, but a launcher started this process"),
    ],
)
def test_launcher_problems_are_one_line_errors_before_the_model_loads(
    tmp_path: Path, capsys, monkeypatch, environment, argv, message
) -> None:
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(LLM2Vec, "from_pretrained", lambda *a, **k: pytest.fail("the model must not load"))
    (tmp_path / "in.txt").write_text("hello\n")
    assert _run(str(MODEL), str(tmp_path / "in.txt"), str(tmp_path / "o.npy"), *argv) == 2
    assert re.fullmatch(f"llm2vec-fast encode: error: {message}[^\n]*\n", capsys.readouterr().err)


def test_merge_arguments_are_checked(tmp_path: Path, capsys) -> None:
    assert _run("--merge", str(tmp_path / "none.chunks"), str(tmp_path / "o.npy")) == 2
    assert re.fullmatch(
        r"llm2vec-fast encode: error: chunk directory .*none.chunks does not exist\n", capsys.readouterr().err
    )
    assert _run("--merge", str(tmp_path), "a", str(tmp_path / "o.npy")) == 2
    assert "takes one more argument, the output .npy or .safetensors" in capsys.readouterr().err
    assert _run("--merge", str(tmp_path), str(tmp_path / "o.chunks")) == 2
    assert "must end in .npy or .safetensors" in capsys.readouterr().err


def test_one_process_per_device_commits_each_chunk_with_its_own_lines(tmp_path: Path) -> None:
    texts = _texts(10, seed=3)
    source = tmp_path / "corpus.txt"
    source.write_text("\n".join(texts) + "\n")
    chunks = tmp_path / "out.chunks"
    argv = [str(MODEL), str(source), str(chunks), "--chunk-size", "3", "--device", "cpu,cpu", "--no-progress"]
    assert _run(*argv) == 0
    assert _records(chunks) == {0: 1, 3: 1, 6: 1, 9: 1}
    assert merge(chunks, tmp_path / "out.npy") == (10, 64)
    _assert_fp32_equal(np.load(tmp_path / "out.npy"), _expected(texts))
