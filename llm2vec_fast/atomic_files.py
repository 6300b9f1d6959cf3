"""Files that are either absent, the old version or the complete new one, never half written.

Training and corpus encoding may die at any instant (Ctrl-C, kill -9, a full disk, a lost node):
everything they write goes to a temporary name beside its destination, is flushed to disk, and is renamed into
place (`os.replace` is atomic on POSIX and Windows). Checksums let a reader tell a complete file
from one truncated or damaged after the fact (a copy cut short, a bad disk).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"  # being written
RETIRED_SUFFIX = ".old"  # replaced, about to be deleted
DOOMED_SUFFIX = ".deleting"  # being deleted
LEFTOVER_SUFFIXES = (TEMPORARY_SUFFIX, RETIRED_SUFFIX, DOOMED_SUFFIX)
_CHUNK_BYTES = 1 << 22


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def flush_to_disk(path: Path) -> None:
    """fsync a file (or, on POSIX, a directory, making the renames in it durable)."""
    if path.is_dir() and os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary_path)``, then move the finished file to `path` in one step."""
    path = Path(path)
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    try:
        write(temporary)
        flush_to_disk(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8", newline=""))


def publish_directory(staging: Path, final: Path) -> None:
    """Move the complete directory `staging` to `final` (replacing a previous `final`, moved aside first)."""
    for file in staging.iterdir():
        flush_to_disk(file)
    if final.exists():
        retired = final.with_name(final.name + RETIRED_SUFFIX)
        remove_directory(retired)
        os.replace(final, retired)
        os.replace(staging, final)
        remove_directory(retired)
    else:
        os.replace(staging, final)
    flush_to_disk(final.parent)


def publish_files(staging: Path, destination: Path) -> None:
    """Move every file of `staging` into `destination`, each in one step (weights last), then remove `staging`."""
    files = sorted(staging.iterdir(), key=lambda file: (file.suffix == ".safetensors", file.name))
    for file in files:
        flush_to_disk(file)
    for file in files:
        os.replace(file, destination / file.name)
    flush_to_disk(destination)
    staging.rmdir()


def remove_directory(path: Path) -> None:
    """Delete a directory tree, renaming it away first so that a crash midway never leaves it half deleted in place."""
    if not path.exists():
        return
    doomed = path.with_name(path.name + DOOMED_SUFFIX)
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)
