"""Random access to the non-blank lines of a file too large to hold in memory.

One streaming pass records the byte offset of every line holding a non-whitespace character
(8 bytes per line, not the text), checking UTF-8 on the way; a line is then read with one seek.
This lets a training run shuffle, shard across processes and resume at any position of a
multi-gigabyte text or JSONL file without loading it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_CHUNK_BYTES = 1 << 24
_WHITESPACE = np.array([9, 10, 11, 12, 13, 32], dtype=np.uint8)


class LineIndex:
    """Offsets of the non-blank lines of `path` (``\\n`` or ``\\r\\n`` endings, blank lines skipped)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"training data file {self.path} does not exist")
        self.starts, self.ends = self._scan()
        self._handle = None

    def _scan(self) -> tuple[np.ndarray, np.ndarray]:
        starts: list[np.ndarray] = []
        ends: list[np.ndarray] = []
        base = 0
        carry = b""
        with open(self.path, "rb") as handle:
            while True:
                block = handle.read(_CHUNK_BYTES)
                data = carry + block
                if not data:
                    break
                cut = data.rfind(b"\n") + 1 if block else len(data)
                if cut == 0:
                    carry = data
                    continue
                complete, carry = data[:cut], data[cut:]
                self._check_utf8(complete, base)
                line_starts, line_ends = self._nonblank_lines(complete)
                starts.append(line_starts + base)
                ends.append(line_ends + base)
                base += len(complete)
                if not block:
                    break
        if not starts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(starts), np.concatenate(ends)

    @staticmethod
    def _nonblank_lines(data: bytes) -> tuple[np.ndarray, np.ndarray]:
        raw = np.frombuffer(data, dtype=np.uint8)
        newlines = np.flatnonzero(raw == 10)
        starts = np.concatenate(([0], newlines + 1)).astype(np.int64)
        ends = np.concatenate((newlines, [len(raw)])).astype(np.int64)
        solid = np.concatenate(([0], np.cumsum(~np.isin(raw, _WHITESPACE), dtype=np.int64)))
        keep = solid[ends] > solid[starts]
        return starts[keep], ends[keep]

    def _check_utf8(self, data: bytes, base: int) -> None:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = self.line_number(base + error.start)
            raise ValueError(f"{self.path}:{line}: not valid UTF-8 ({error.reason})") from None

    def line_number(self, offset: int) -> int:
        """1-based line number of the byte at `offset` (reads the file up to it: for error messages)."""
        count = 1
        with open(self.path, "rb") as handle:
            remaining = offset
            while remaining > 0:
                block = handle.read(min(_CHUNK_BYTES, remaining))
                if not block:
                    break
                count += block.count(b"\n")
                remaining -= len(block)
        return count

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, i: int) -> str:
        """The text of non-blank line `i` (0-based among non-blank lines), without its line ending."""
        if self._handle is None:
            self._handle = open(self.path, "rb")
        start, end = int(self.starts[i]), int(self.ends[i])
        self._handle.seek(start)
        text = self._handle.read(end - start).decode("utf-8").rstrip("\r")
        return text.removeprefix("\ufeff") if start == 0 else text

    def location(self, i: int) -> str:
        """``path:line`` of non-blank line `i`, for error messages."""
        return f"{self.path}:{self.line_number(int(self.starts[i]))}"
