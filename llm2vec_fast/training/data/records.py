"""Training examples read from local files: plain text lines and JSONL query/positive/negative records.

Files are indexed, not loaded (see `LineIndex`), so they may be larger than memory. JSONL records
are checked in a streaming pass before training starts (unless disabled), so a malformed line
fails the run at once with its file and line number instead of hours later.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from pathlib import Path

from .line_index import LineIndex


@dataclass(frozen=True)
class ContrastiveExample:
    """A query (with an optional task instruction), its positive and any number of hard negatives."""

    query: str
    positive: str
    negatives: tuple[str, ...]
    instruction: str


class TextLines:
    """The non-blank lines of one or more text files, as one sequence of strings."""

    def __init__(self, paths: list[str | Path]):
        if not paths:
            raise ValueError("no training text files given")
        self.indexes = [LineIndex(p) for p in paths]
        self.offsets = [0]
        for index in self.indexes:
            self.offsets.append(self.offsets[-1] + len(index))
        if len(self) == 0:
            raise ValueError(f"training data files {', '.join(map(str, paths))} hold no non-blank lines")

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, i: int) -> tuple[LineIndex, int]:
        for index, start, end in zip(self.indexes, self.offsets[:-1], self.offsets[1:]):
            if start <= i < end:
                return index, i - start
        raise IndexError(f"line {i} out of range for {len(self)} lines")

    def __getitem__(self, i: int) -> str:
        index, local = self._locate(i)
        return index.read(local)


class ContrastiveFile:
    """One JSONL file of ``{"query", "positive", ["negative" | "negatives"], ["instruction"]}`` records: one data set.

    ``instruction`` is the record's own field when present, else `instruction` (a string, or a list
    cycled through by line as the official E5 loader does), else none.
    """

    KEYS = {"query", "positive", "negative", "negatives", "instruction"}

    def __init__(self, path: str | Path, instruction: str | list[str] | None = None, validate: bool = True):
        self.index = LineIndex(path)
        self.name = self.index.path.stem
        self.instructions = [instruction] if isinstance(instruction, str) else list(instruction or [])
        if len(self.index) == 0:
            raise ValueError(f"training data file {self.index.path} holds no records")
        if validate:
            for i in range(len(self.index)):
                self[i]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> ContrastiveExample:
        def fail(message: str) -> typing.NoReturn:
            raise ValueError(f"{self.index.location(i)}: {message}")

        try:
            record = json.loads(self.index.read(i))
        except json.JSONDecodeError as error:
            fail(f"invalid JSON ({error.msg} at column {error.colno})")
        if not isinstance(record, dict):
            fail(f"a record must be a JSON object, got {type(record).__name__}")
        missing = {"query", "positive"} - set(record)
        if missing:
            fail(f"missing key(s) {', '.join(sorted(missing))}")
        unknown = set(record) - self.KEYS
        if unknown:
            fail(f"unknown key(s) {', '.join(sorted(unknown))}; expected some of {', '.join(sorted(self.KEYS))}")
        if "negative" in record and "negatives" in record:
            fail("give either 'negative' or 'negatives', not both")
        negatives = record.get("negatives", [record["negative"]] if "negative" in record else [])
        if not isinstance(negatives, list):
            fail("'negatives' must be a list of strings")
        for key, value in [("query", record["query"]), ("positive", record["positive"])] + [
            ("negative", n) for n in negatives
        ]:
            if not isinstance(value, str) or not value.strip():
                fail(f"{key!r} must be a non-empty string, got {value!r}")
        instruction = record.get("instruction")
        if instruction is None:
            instruction = self.instructions[i % len(self.instructions)] if self.instructions else ""
        elif not isinstance(instruction, str):
            fail(f"'instruction' must be a string, got {instruction!r}")
        return ContrastiveExample(record["query"], record["positive"], tuple(negatives), instruction.strip())


def contrastive_files(
    paths: list[str], instructions: dict[str, str | list[str]], validate: bool
) -> list[ContrastiveFile]:
    """The data sets named by `paths` (JSONL files, or directories whose ``*.jsonl`` files are each one data set)."""
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            found = sorted(entry.glob("*.jsonl"))
            if not found:
                raise ValueError(f"training data directory {entry} holds no *.jsonl files")
            files.extend(found)
        elif entry.is_file():
            files.append(entry)
        else:
            raise FileNotFoundError(f"training data file {entry} does not exist")
    names = [f.stem for f in files]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"two training files share the data set name(s) {', '.join(duplicates)} (file stems must differ)"
        )
    unused = sorted(set(instructions) - set(names))
    if unused:
        raise ValueError(
            f"'instructions' names data set(s) {', '.join(unused)} but no training file is so named; "
            f"data sets: {', '.join(names)}"
        )
    return [ContrastiveFile(f, instructions.get(f.stem), validate) for f in files]
