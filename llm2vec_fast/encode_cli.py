"""``llm2vec-fast encode``: embed a text file into a ``.npy`` or ``.safetensors`` matrix, streaming.

Input: ``.txt`` (one text per line; row i of the output is line i) or ``.jsonl`` (one JSON value per
line: a string, an ``[instruction, text]`` pair, or an object with a ``text`` field and an optional
``instruction`` field; blank lines skipped). The input is checked (and counted) before the model
loads, then encoded chunk by chunk and written as it goes, so its size is not limited by memory.
The output is written to ``OUTPUT.partial`` and renamed when complete.

Lines end at ``\n`` only (a ``\r\n`` ending is removed too; a ``\r`` inside a line is part of the text).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .backends import BACKENDS
from .cli_common import add_verbose_flag, report_error
from .loading import ADAPTER_CONFIG_NAME, quiet_libraries
from .pooling import POOLING_MODES
from .runtime import check_backend, check_device, default_device

INPUT_SUFFIXES = (".txt", ".jsonl")
OUTPUT_SUFFIXES = (".npy", ".safetensors")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SAFETENSORS_KEY = "embeddings"
POSITIVE_OPTIONS = ("batch_size", "max_batch_tokens", "max_length", "doc_max_length", "chunk_size")
INTERRUPTED = 130  # the shell's status for a command ended by SIGINT


class UsageError(Exception):
    """A problem with the command line or the files it names; reported without a traceback."""


class Interrupted(Exception):
    """Ctrl-C: reported in one line (how far encoding got), nothing written."""


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Numbered lines of a UTF-8 file, split on ``\n`` only, without their ``\n`` or ``\r\n`` ending."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise UsageError(f"{path}:{number}: not valid UTF-8 ({error.reason})") from None
            yield number, line[:-2] if line.endswith("\r\n") else line.removesuffix("\n")


def _read_items(path: Path) -> Iterator[str | list[str]]:
    """Texts (or [instruction, text] pairs) of an input file, validated, in order."""
    for number, line in _lines(path):
        if path.suffix == ".txt":
            yield line
            continue
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(f"{path}:{number}: invalid JSON ({error.msg})") from None
        yield _jsonl_item(value, f"{path}:{number}")


def _jsonl_item(value: Any, where: str) -> str | list[str]:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, dict) and isinstance(value.get("text"), str):
        instruction = value.get("instruction")
        if instruction is None:
            return value["text"]
        if not isinstance(instruction, str):
            raise UsageError(f'{where}: "instruction" must be a string')
        return [instruction, value["text"]]
    raise UsageError(f'{where}: expected a string, an [instruction, text] pair or an object with a "text" string')


def _check_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    source, target = Path(args.input), Path(args.output)
    if not source.exists():
        raise UsageError(f"input file {source} does not exist")
    if not source.is_file():
        raise UsageError(f"input {source} is not a file")
    if source.suffix not in INPUT_SUFFIXES:
        raise UsageError(f"input {source} must end in {' or '.join(INPUT_SUFFIXES)}")
    if target.suffix not in OUTPUT_SUFFIXES:
        raise UsageError(f"output {target} must end in {' or '.join(OUTPUT_SUFFIXES)}")
    if target.is_dir():
        raise UsageError(f"output {target} is a directory")
    if not target.parent.is_dir():
        raise UsageError(f"output directory {target.parent} does not exist")
    model = Path(args.model)
    if model.exists() and not any((model / name).is_file() for name in ("config.json", ADAPTER_CONFIG_NAME)):
        raise UsageError(
            f"model path {model} has no config.json or {ADAPTER_CONFIG_NAME} "
            "(expected a Hugging Face model directory or an MNTP adapter directory)"
        )
    if not model.exists() and (args.model.startswith((".", "/", "~")) or args.model.count("/") > 1):
        raise UsageError(f"model path {args.model} does not exist (and is not a Hugging Face hub id)")
    return source, target


def _check_numbers(args: argparse.Namespace) -> None:
    for name in POSITIVE_OPTIONS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def _devices(args: argparse.Namespace) -> list[str]:
    """The devices to encode on (``--device``, else CUDA when present), each checked with the backend."""
    names = [d.strip() for d in args.device.split(",")] if args.device else [str(default_device())]
    for name in names:
        try:
            check_device(name)
            check_backend(args.backend, name)
        except (TypeError, ValueError) as error:
            raise UsageError(str(error)) from None
    return names


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
def _open_output(path: Path, suffix: str, shape: tuple[int, int], metadata: dict[str, str]) -> Iterator[Any]:
    """A function writing the next rows of a float32 matrix of `shape` into `path` (``.npy`` or ``.safetensors``)."""
    if suffix == ".npy":
        matrix = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
        rows = 0

        def write(block: np.ndarray) -> None:
            nonlocal rows
            matrix[rows : rows + len(block)] = block
            rows += len(block)

        yield write
        matrix.flush()
        del matrix
        return
    with open(path, "wb") as handle:
        yield _SafetensorsWriter(handle, *shape, metadata).write


def _dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def run_encode(args: argparse.Namespace) -> int:
    """Entry point of ``llm2vec-fast encode``; returns the exit status."""
    try:
        with quiet_libraries(args.verbose):
            return _encode(args)
    except UsageError as error:
        return report_error("encode", error)
    except Interrupted as interruption:
        print(f"llm2vec-fast encode: {interruption}", file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:
        print("llm2vec-fast encode: interrupted before encoding; nothing written", file=sys.stderr)
        return INTERRUPTED


class _BatchProgress:
    """Moves a tqdm bar after each forward (not each chunk) and shows texts/s and tokens/s since the first batch."""

    def __init__(self, bar: Any):
        self.bar, self.texts, self.tokens, self.start = bar, 0, 0, time.perf_counter()

    def __call__(self, texts: int, tokens: int | None) -> None:
        self.texts += texts
        self.tokens += tokens or 0
        seconds = max(time.perf_counter() - self.start, 1e-9)
        rates = {"texts/s": f"{self.texts / seconds:,.0f}"}
        if self.tokens:
            rates["tokens/s"] = f"{self.tokens / seconds:,.0f}"
        self.bar.set_postfix(rates, refresh=False)
        self.bar.update(texts)


def _encode(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .encoder import LLM2Vec

    source, target = _check_paths(args)
    _check_numbers(args)
    devices = _devices(args)
    count = sum(1 for _ in _read_items(source))  # validates every line before the model loads
    try:
        encoder = LLM2Vec.from_pretrained(
            args.model,
            peft_model_name_or_path=args.peft,
            merge_peft=args.merge_peft,
            enable_bidirectional=not args.causal,
            pooling_mode=args.pooling,
            max_length=args.max_length,
            doc_max_length=args.doc_max_length,
            skip_instruction=False if args.keep_instruction else None,
            attention_backend=args.backend,
            dtype=_dtype(args.dtype, devices[0]),
            verbose=args.verbose,
        )
    except (OSError, ValueError) as error:
        raise UsageError(f"could not load model {args.model}: {error}") from None
    width = encoder.model.config.hidden_size
    progress = tqdm(total=count, desc="Encoding", unit="text", disable=args.no_progress)
    stream = encoder.encode_stream(
        _read_items(source),
        chunk_size=args.chunk_size,
        devices=devices if len(devices) > 1 else None,
        device=devices[0],
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        instruction=args.instruction,
        convert_to_numpy=True,
        on_batch=_BatchProgress(progress),
    )
    partial = target.with_name(target.name + ".partial")
    metadata = {"model": str(args.model), "pooling_mode": encoder.pooling_mode, "instruction": args.instruction or ""}
    done = 0
    try:
        with progress, _open_output(partial, target.suffix, (count, width), metadata) as write:
            for block in stream:
                write(block)
                done += len(block)
        os.replace(partial, target)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted after {done} of {count} texts; nothing written") from None
    finally:
        stream.close()  # stops encoding processes at once
        if partial.exists():
            partial.unlink()
    print(f"wrote {count} x {width} float32 embeddings to {target}", file=sys.stderr)
    return 0


def add_encode_command(subparsers: Any) -> None:
    """Add ``encode`` to an argparse subparsers object (``func`` set to :func:`run_encode`)."""
    parser = subparsers.add_parser(
        "encode",
        help="embed a .txt/.jsonl file into a .npy/.safetensors matrix",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("model", help="model or MNTP adapter directory (or hub id), as for LLM2Vec.from_pretrained")
    parser.add_argument("input", help="input .txt (one text per line) or .jsonl")
    parser.add_argument("output", help="output .npy or .safetensors (float32, one row per input)")
    parser.add_argument("--peft", default=None, help="PEFT/LoRA adapter directory to load on top of the model")
    parser.add_argument("--merge-peft", action="store_true", help="merge the adapter into the weights")
    parser.add_argument("--pooling", choices=POOLING_MODES, help="pooling mode (default: saved config, else mean)")
    parser.add_argument("--instruction", default=None, help="instruction for inputs that carry none")
    parser.add_argument("--keep-instruction", action="store_true", help="include instruction tokens in mean pooling")
    parser.add_argument("--causal", action="store_true", help="keep causal attention (no bidirectional conversion)")
    parser.add_argument("--batch-size", type=int, default=32, help="max sequences per forward (default 32)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="max tokens per forward (token budget)")
    parser.add_argument("--max-length", type=int, help="truncate inputs to this many tokens (default 512)")
    parser.add_argument("--doc-max-length", type=int, help="trim texts to about this many tokens (default 400)")
    parser.add_argument("--chunk-size", type=int, default=4096, help="inputs read and encoded at a time (default 4096)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on CUDA, else float32")
    parser.add_argument("--device", default=None, help="device, or a comma-separated list for one process per device")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), help="force an attention backend")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_verbose_flag(parser)
    parser.set_defaults(func=run_encode)
