"""A directory of embedding chunks: the resumable form of an ``llm2vec-fast encode`` output, and its merge.

``DIR`` (``OUTPUT.chunks`` while ``OUTPUT.npy`` is encoded, or a ``.chunks`` output kept as it is) holds::

    lines-000000000000-000000004096.npy   float32 (rows, width) embeddings of input lines [0, 4096)
    manifest-w2-r0.jsonl                  rank 0 of a run on 2 processes: a header line, one record per chunk

A manifest's header names the input (path, size, line count, SHA-256), the chunk size, the model (weights and
tokenizer fingerprints) and the settings that decide the vectors, and its writer's world size and rank; each
record names a chunk's line range, file, rows and the file's SHA-256. A chunk file is written atomically
(temporary name, fsync, rename) before its record is appended and fsync'ed, so a kill at any instant loses at
most the chunks in flight. Chunks are keyed by line range, not by rank: a run resumes on any number of
processes. A directory whose manifests were made with another input, model or settings is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .atomic_files import flush_to_disk, sha256, write_atomically

FORMAT = 1
CHUNKS_SUFFIX = ".chunks"
MATRIX_SUFFIXES = (".npy", ".safetensors")
SAFETENSORS_KEY = "embeddings"
IDENTITY_FIELDS = ("format", "input", "chunk_lines", "width", "model", "settings")
"""Header fields that must match for a directory to be resumed or merged; the paths inside them need not (a moved
input or model with the same contents is the same)."""


class StoreError(ValueError):
    """A chunk directory that cannot be resumed or merged (other settings, a missing or damaged chunk)."""


@dataclass(frozen=True)
class ChunkRecord:
    """One committed chunk: input lines ``[first, stop)``, the file holding their embeddings, its rows and SHA-256."""

    first: int
    stop: int
    file: str
    rows: int
    sha256: str


def chunk_file_name(first: int, stop: int) -> str:
    return f"lines-{first:012d}-{stop:012d}.npy"


def _identity(header: dict[str, Any]) -> dict[str, Any]:
    """What decides the vectors: the header without its paths, world size and rank."""
    kept = {name: header.get(name) for name in IDENTITY_FIELDS}
    return {
        name: {k: v for k, v in value.items() if not k.endswith("path")} if isinstance(value, dict) else value
        for name, value in kept.items()
    }


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    names = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key), new.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            names += _differences(before, after, f"{prefix}{key}.")
        elif before != after:
            names.append(f"{prefix}{key} {before!r} there, {after!r} now")
    return names


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, list[ChunkRecord]]:
    """Header and records of one manifest; a last line cut short by a kill is ignored."""
    lines = path.read_text(encoding="utf-8").split("\n")
    complete = lines[:-1]  # the text after the last newline was never finished
    if not complete:
        return None, []
    try:
        header = json.loads(complete[0])["header"]
        records = [ChunkRecord(**json.loads(line)) for line in complete[1:]]
    except (ValueError, KeyError, TypeError):
        raise StoreError(f"{path} is not an llm2vec-fast encode manifest") from None
    return header, records


class ChunkStore:
    """Chunks of one encode run in `directory`: which are done and verified, and committing new ones.

    Opening checks every manifest already there against `header` (refusing a directory made with another
    input, model or settings); this process's own manifest is created on its first commit.
    """

    def __init__(self, directory: Path, header: dict[str, Any], rank: int = 0, world_size: int = 1):
        self.directory = Path(directory)
        self.header = header
        self.manifest = self.directory / f"manifest-w{world_size}-r{rank}.jsonl"
        self._manifest_header = {"header": {**header, "world_size": world_size, "rank": rank}}
        self.records: dict[int, list[ChunkRecord]] = {}
        if self.directory.exists() and not self.directory.is_dir():
            raise StoreError(f"chunk directory {self.directory} is not a directory")
        for path in sorted(self.directory.glob("manifest-*.jsonl")):
            found, records = _read_manifest(path)
            if found is not None and _identity(found) != _identity(header):
                differences = "; ".join(_differences(_identity(found), _identity(header)))
                raise StoreError(
                    f"{self.directory} was made with another input, model or settings ({differences}): "
                    "use another output or delete it"
                )
            for record in records:
                self.records.setdefault(record.first, []).append(record)
        self._opened = False

    def verified(self, first: int) -> ChunkRecord | None:
        """The record of the chunk starting at line `first` whose file is there and matches its checksum."""
        for record in reversed(self.records.get(first, [])):
            path = self.directory / record.file
            if path.is_file() and sha256(path) == record.sha256:
                return record
        return None

    def commit(self, first: int, stop: int, block: np.ndarray) -> ChunkRecord:
        """Write the embeddings of lines ``[first, stop)`` atomically, then record them in this rank's manifest."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(block, dtype=np.float32))
        data = buffer.getvalue()
        record = ChunkRecord(first, stop, chunk_file_name(first, stop), len(block), hashlib.sha256(data).hexdigest())
        self.ensure_manifest()
        write_atomically(self.directory / record.file, lambda temporary: temporary.write_bytes(data))
        flush_to_disk(self.directory)
        self._append(json.dumps(asdict(record)))
        self.records.setdefault(first, []).append(record)
        return record

    def _append(self, line: str) -> None:
        with open(self.manifest, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def ensure_manifest(self) -> None:
        """Start this rank's manifest, or keep its complete lines (a kill may have cut the last one short)."""
        if self._opened:
            return
        self.directory.mkdir(exist_ok=True)
        text = self.manifest.read_text(encoding="utf-8") if self.manifest.exists() else ""
        complete = text[: text.rfind("\n") + 1]
        if not complete:
            complete = json.dumps(self._manifest_header) + "\n"
        if complete != text:
            write_atomically(self.manifest, lambda temporary: temporary.write_text(complete, encoding="utf-8"))
            flush_to_disk(self.directory)
        self._opened = True


def read_store(directory: Path) -> tuple[dict[str, Any], ChunkStore]:
    """The header shared by every manifest of `directory` and the store it describes (for merging)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StoreError(f"chunk directory {directory} does not exist")
    manifests = sorted(directory.glob("manifest-*.jsonl"))
    headers = [header for header in (_read_manifest(path)[0] for path in manifests) if header is not None]
    if not headers:
        raise StoreError(f"{directory} has no manifest (no chunk was committed there)")
    return headers[0], ChunkStore(directory, headers[0])


def plan_merge(directory: Path) -> tuple[dict[str, Any], list[list[ChunkRecord]]]:
    """Header and the records of each chunk, in input order, after checking that every line is covered exactly once
    (a chunk recomputed after damage has several records: its file matches one)."""
    header, store = read_store(directory)
    lines, chunk_lines = header["input"]["lines"], header["chunk_lines"]
    expected = [(first, min(first + chunk_lines, lines)) for first in range(0, lines, chunk_lines)]
    unknown = sorted(set(store.records) - {first for first, _ in expected})
    if unknown:
        raise StoreError(f"{directory} has a chunk starting at line {unknown[0]}, not a multiple of {chunk_lines}")
    plan, missing = [], []
    for first, stop in expected:
        ranges = {(r.first, r.stop, r.rows) for r in store.records.get(first, [])}
        if len(ranges) > 1 or {(a, b) for a, b, _ in ranges} - {(first, stop)}:
            raise StoreError(f"{directory}: records of lines {first}-{stop} disagree: {sorted(ranges)}")
        if first in store.records:
            plan.append(store.records[first])
        else:
            missing.append(f"{first}-{stop}")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise StoreError(
            f"{directory} is incomplete: lines {', '.join(missing[:3])}{more} of {lines} are not encoded "
            "(rerun the encode command to finish them)"
        )
    return header, plan


def _read_chunk(directory: Path, records: list[ChunkRecord], width: int) -> np.ndarray:
    """A chunk's embeddings, after checking its file's SHA-256 and shape against one of its records."""
    path = directory / records[0].file
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"chunk file {path} is missing (rerun the encode command to recompute it)") from None
    digest = hashlib.sha256(data).hexdigest()
    record = next((record for record in records if record.sha256 == digest), None)
    if record is None:
        raise StoreError(f"chunk file {path} is damaged (checksum mismatch): rerun the encode command to recompute it")
    block = np.load(io.BytesIO(data))
    if block.dtype != np.float32 or block.shape != (record.rows, width):
        expected = f"float32 ({record.rows}, {width})"
        raise StoreError(f"chunk file {path} holds {block.dtype} {block.shape}, expected {expected}")
    return block


def merge(directory: Path, target: Path) -> tuple[int, int]:
    """Write every chunk of `directory`, in input order, into one ``.npy``/``.safetensors`` `target` (atomically),
    checking that every input line is covered once and every chunk file's checksum; returns ``(rows, width)``."""
    header, plan = plan_merge(directory)
    width = header["width"]
    shape = (sum(records[-1].rows for records in plan), width)
    settings = header["settings"]
    metadata = {
        "model": str(header["model"]["path"]),
        "pooling_mode": settings["pooling_mode"],
        "instruction": settings["instruction"] or "",
    }

    def write(temporary: Path) -> None:
        with open_matrix(temporary, Path(target).suffix, shape, metadata) as append:
            for records in plan:
                append(_read_chunk(Path(directory), records, width))

    write_atomically(Path(target), write)
    flush_to_disk(Path(target).parent)
    return shape


class _SafetensorsWriter:
    """Streams one float32 ``(rows, width)`` tensor into a safetensors file (header first, then raw rows)."""

    def __init__(self, handle: BinaryIO, rows: int, width: int, metadata: dict[str, str]):
        header = {
            "__metadata__": metadata,
            SAFETENSORS_KEY: {"dtype": "F32", "shape": [rows, width], "data_offsets": [0, rows * width * 4]},
        }
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        self._handle = handle

    def write(self, block: np.ndarray) -> None:
        self._handle.write(np.ascontiguousarray(block, dtype="<f4").tobytes())


@contextmanager
def open_matrix(
    path: Path, suffix: str, shape: tuple[int, int], metadata: dict[str, str]
) -> Iterator[Callable[[np.ndarray], None]]:
    """A function writing the next rows of a float32 matrix of `shape` into `path` (``.npy`` or ``.safetensors``)."""
    if suffix == ".npy":
        with open(path, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": shape})
            yield lambda block: handle.write(np.ascontiguousarray(block, dtype="<f4").tobytes())
        return
    with open(path, "wb") as handle:
        yield _SafetensorsWriter(handle, *shape, metadata).write
