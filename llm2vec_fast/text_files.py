"""Input files of ``llm2vec-fast encode``, read by line range so that no process holds a whole corpus.

``.txt``: one text per line (row i of the output is line i). ``.jsonl``: one JSON value per line, a string,
an ``[instruction, text]`` pair, or an object with a ``text`` field and an optional ``instruction`` field;
blank lines skipped. Lines end at ``\\n`` only (a ``\\r\\n`` ending is removed too; a ``\\r`` inside a line is
part of the text).

:func:`index_lines` scans a file once in large binary blocks for where every ``chunk_lines``-th line starts
(and its SHA-256); :func:`read_chunk` then reads one range of lines from its byte offset.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INPUT_SUFFIXES = (".txt", ".jsonl")
_BLOCK_BYTES = 1 << 24
_NEWLINE = ord("\n")

Item = str | list[str]
"""A text, or an ``[instruction, text]`` pair."""


class InputError(ValueError):
    """A line that is not valid input (not UTF-8, bad JSON, wrong shape), named by file and line number."""


@dataclass(frozen=True)
class LineIndex:
    """Where each chunk of `chunk_lines` lines of `path` starts; the file's size, line count and SHA-256."""

    path: Path
    size: int
    lines: int
    sha256: str
    chunk_lines: int
    offsets: tuple[int, ...]

    @property
    def chunks(self) -> int:
        return len(self.offsets)

    def line_range(self, chunk: int) -> tuple[int, int]:
        """``(first, stop)``: the 0-based lines of `chunk`, `stop` excluded."""
        first = chunk * self.chunk_lines
        return first, min(first + self.chunk_lines, self.lines)


def index_lines(path: Path, chunk_lines: int) -> LineIndex:
    """Scan `path` once (vectorised over 16 MiB blocks; memory does not grow with the file)."""
    offsets: list[int] = []
    digest = hashlib.sha256()
    newlines = position = 0  # newlines before the current block, its byte offset
    last = b""
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK_BYTES):
            digest.update(block)
            if not offsets:
                offsets.append(0)
            count = block.count(b"\n")
            boundary = len(offsets) * chunk_lines  # the next chunk starts after newline number `boundary`
            if newlines + count >= boundary:
                ends = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == _NEWLINE)
                for number in range(boundary - newlines, count + 1, chunk_lines):
                    offsets.append(position + int(ends[number - 1]) + 1)
            newlines += count
            position += len(block)
            last = block[-1:]
    lines = newlines + (1 if position and last != b"\n" else 0)
    starts = tuple(offset for offset in offsets if offset < position)  # a last newline starts no line
    return LineIndex(Path(path), position, lines, digest.hexdigest(), chunk_lines, starts)


def _decode(raw: bytes, where: str) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{where}: not valid UTF-8 ({error.reason})") from None
    return line[:-2] if line.endswith("\r\n") else line.removesuffix("\n")


def read_chunk(index: LineIndex, chunk: int) -> list[Item]:
    """The items of `chunk`'s lines, validated, in order (blank ``.jsonl`` lines give none)."""
    first, stop = index.line_range(chunk)
    items: list[Item] = []
    with open(index.path, "rb") as handle:
        handle.seek(index.offsets[chunk])
        for number in range(first + 1, stop + 1):
            where = f"{index.path}:{number}"
            line = _decode(handle.readline(), where)
            if index.path.suffix == ".txt":
                items.append(line)
            elif line.strip():
                items.append(jsonl_item(_parse_json(line, where), where))
    return items


def _parse_json(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(f"{where}: invalid JSON ({error.msg})") from None


def jsonl_item(value: Any, where: str) -> Item:
    """The item one ``.jsonl`` value stands for; `where` (``path:line``) names it in the error."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        instruction = value.get("instruction")
        if instruction is None:
            return value["text"]
        if not isinstance(instruction, str):
            raise InputError(f'{where}: "instruction" must be a string')
        return [instruction, value["text"]]
    raise InputError(f'{where}: expected a string, an [instruction, text] pair or an object with a "text" string')
