"""``llm2vec-fast encode``: embed a text file into a ``.npy`` or ``.safetensors`` matrix, resumable, on any launcher.

Input: ``.txt`` (one text per line; row i of the output is line i) or ``.jsonl`` (one JSON value per
line: a string, an ``[instruction, text]`` pair, or an object with a ``text`` field and an optional
``instruction`` field; blank lines skipped). Lines of every chunk are checked before the model loads.
Embeddings are committed chunk by chunk (``--chunk-size`` lines) into ``OUTPUT.chunks/``, so a run
that is interrupted or killed resumes where it stopped when run again; once every chunk is there,
they are merged into OUTPUT and the directory removed. An OUTPUT ending in ``.chunks`` keeps the
chunks as they are (merge later with ``--merge DIR OUTPUT``). Under a torch.distributed launcher
(``torchrun``: RANK, WORLD_SIZE, LOCAL_RANK) process r encodes chunks r, r + WORLD_SIZE, ... on
``cuda:LOCAL_RANK`` (or the CPU), and rank 0 merges.

Lines end at ``\\n`` only (a ``\\r\\n`` ending is removed too; a ``\\r`` inside a line is part of the text).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from .atomic_files import remove_directory
from .backends import BACKENDS
from .chunk_store import CHUNKS_SUFFIX, FORMAT, MATRIX_SUFFIXES, ChunkStore, StoreError, merge, plan_merge
from .cli_common import add_verbose_flag, report_error
from .loading import ADAPTER_CONFIG_NAME, quiet_libraries
from .pooling import POOLING_MODES
from .runtime import check_backend, check_device, default_device
from .text_files import INPUT_SUFFIXES, InputError, LineIndex, index_lines, read_chunk

OUTPUT_SUFFIXES = (*MATRIX_SUFFIXES, CHUNKS_SUFFIX)
DTYPES = ("auto", "float32", "bfloat16", "float16")
POSITIVE_OPTIONS = ("batch_size", "max_batch_tokens", "max_length", "doc_max_length", "chunk_size")
INTERRUPTED = 130  # the shell's status for a command ended by SIGINT
WEIGHT_SAMPLE = 4096  # leading elements of each weight that the model fingerprint hashes
BARRIER_TIMEOUT = timedelta(hours=24)  # ranks wait at the end for the slowest one before rank 0 merges


class UsageError(Exception):
    """A problem with the command line or the files it names; reported without a traceback."""


class PeerFailed(Exception):
    """Another launched process died before finishing its chunks; this one's are kept for a resume."""


class Interrupted(Exception):
    """Ctrl-C: reported in one line (how far encoding got, what is kept for a resume)."""


@dataclass(frozen=True)
class Launch:
    """This process's place among the processes a launcher started (one process without a launcher)."""

    rank: int
    world_size: int
    local_rank: int
    launched: bool


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name} must be an integer, got {value!r}") from None


def _launch() -> Launch:
    world_size, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"RANK={rank} and WORLD_SIZE={world_size} from the launcher are inconsistent")
    return Launch(rank, world_size, _env_int("LOCAL_RANK", 0), "LOCAL_RANK" in os.environ)


def _join_group(launch: Launch) -> None:
    """Join the launcher's processes (gloo: only a barrier is exchanged, on GPUs too)."""
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
    except (ValueError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"could not join the {launch.world_size} launched processes: {first_line}") from None


def _check_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    source, target = Path(args.input), Path(args.output)
    if not source.exists():
        raise UsageError(f"input file {source} does not exist")
    if not source.is_file():
        raise UsageError(f"input {source} is not a file")
    if source.suffix not in INPUT_SUFFIXES:
        raise UsageError(f"input {source} must end in {' or '.join(INPUT_SUFFIXES)}")
    _check_output(target, OUTPUT_SUFFIXES)
    model = Path(args.model)
    if model.exists() and not any((model / name).is_file() for name in ("config.json", ADAPTER_CONFIG_NAME)):
        raise UsageError(
            f"model path {model} has no config.json or {ADAPTER_CONFIG_NAME} "
            "(expected a Hugging Face model directory or an MNTP adapter directory)"
        )
    if not model.exists() and (args.model.startswith((".", "/", "~")) or args.model.count("/") > 1):
        raise UsageError(f"model path {args.model} does not exist (and is not a Hugging Face hub id)")
    return source, target


def _check_output(target: Path, suffixes: Sequence[str]) -> None:
    if target.suffix not in suffixes:
        raise UsageError(f"output {target} must end in {', '.join(suffixes[:-1])} or {suffixes[-1]}")
    if target.suffix != CHUNKS_SUFFIX and target.is_dir():
        raise UsageError(f"output {target} is a directory")
    if target.suffix == CHUNKS_SUFFIX and target.exists() and not target.is_dir():
        raise UsageError(f"output {target} exists and is not a directory")
    if not target.parent.is_dir():
        raise UsageError(f"output directory {target.parent} does not exist")


def _check_numbers(args: argparse.Namespace) -> None:
    for name in POSITIVE_OPTIONS:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def _devices(args: argparse.Namespace, launch: Launch) -> list[str]:
    """The devices to encode on (``--device``, else CUDA when present), each checked with the backend.

    A launched process takes ``cuda:LOCAL_RANK`` for ``cuda``; it encodes on one device."""
    names = [d.strip() for d in args.device.split(",")] if args.device else [str(default_device())]
    if launch.launched and len(names) > 1:
        raise UsageError(
            f"--device lists {len(names)} devices, but a launcher started this process (one device per process): "
            "give cpu or cuda, and each process takes cuda:LOCAL_RANK"
        )
    if launch.launched and names == ["cuda"]:
        names = [f"cuda:{launch.local_rank}"]
    for name in names:
        try:
            check_device(name)
            check_backend(args.backend, name)
        except (TypeError, ValueError) as error:
            raise UsageError(str(error)) from None
    return names


def _dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def _weights_fingerprint(model: Any) -> str:
    """SHA-256 of every weight's name, shape, dtype and first elements (a merged adapter changes them all)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        sample = tensor.detach().reshape(-1)[:WEIGHT_SAMPLE].float().cpu().numpy()
        digest.update(f"{name} {tuple(tensor.shape)} {tensor.dtype}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _header(args: argparse.Namespace, index: LineIndex, encoder: Any, dtype: Any) -> dict[str, Any]:
    """What the chunks of this run are made of: input, chunk size, model and the settings that decide the vectors."""
    return {
        "format": FORMAT,
        "input": {"path": str(index.path.resolve()), "size": index.size, "lines": index.lines, "sha256": index.sha256},
        "chunk_lines": index.chunk_lines,
        "width": encoder.model.config.hidden_size,
        "model": {
            "path": str(args.model),
            "peft_path": args.peft,
            "weights_sha256": _weights_fingerprint(encoder.model),
            "tokenizer_sha256": _tokenizer_fingerprint(encoder.tokenizer),
        },
        "settings": {
            "pooling_mode": encoder.pooling_mode,
            "max_length": encoder.max_length,
            "doc_max_length": encoder.doc_max_length,
            "skip_instruction": encoder.skip_instruction,
            "bidirectional": not args.causal,
            "merge_peft": args.merge_peft,
            "dtype": str(dtype).removeprefix("torch."),
            "instruction": args.instruction,
        },
    }


def run_encode(args: argparse.Namespace) -> int:
    """Entry point of ``llm2vec-fast encode``; returns the exit status."""
    try:
        with quiet_libraries(args.verbose):
            return _merge_only(args) if args.merge else _encode(args)
    except (UsageError, InputError, StoreError) as error:
        return report_error("encode", error)
    except PeerFailed as failure:
        print(f"llm2vec-fast encode: error: {failure}", file=sys.stderr)
        return 1
    except Interrupted as interruption:
        print(f"llm2vec-fast encode: {interruption}", file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:
        print("llm2vec-fast encode: interrupted before encoding; nothing written", file=sys.stderr)
        return INTERRUPTED
    finally:
        _leave_group()


def _leave_group() -> None:
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


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


def _encoded_chunks(
    encoder: Any, index: LineIndex, chunks: list[int], devices: list[str], args: argparse.Namespace, on_batch: Any
) -> Iterator[np.ndarray]:
    """The float32 embeddings of each of `chunks`, in order: one process per device if several."""
    batching = dict(batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens)
    if len(devices) > 1:
        from .encode_pool import encode_on_devices
        from .encoder import to_pairs

        pairs = (to_pairs(read_chunk(index, chunk), args.instruction) for chunk in chunks)
        for block in encode_on_devices(encoder, pairs, devices, **batching):
            on_batch(len(block), None)
            yield block.numpy()
        return
    width = encoder.model.config.hidden_size
    for chunk in chunks:
        items = read_chunk(index, chunk)
        blocks = encoder.encode_stream(
            items,
            chunk_size=max(len(items), 1),
            device=devices[0],
            instruction=args.instruction,
            convert_to_numpy=True,
            on_batch=on_batch,
            **batching,
        )
        yield next(iter(blocks), np.zeros((0, width), dtype=np.float32))


def _chunk_directory(target: Path) -> Path:
    return target if target.suffix == CHUNKS_SUFFIX else target.with_name(target.name + CHUNKS_SUFFIX)


def _say(launch: Launch, message: str) -> None:
    prefix = f"rank {launch.rank}: " if launch.world_size > 1 else ""
    print(f"llm2vec-fast encode: {prefix}{message}", file=sys.stderr)


def _todo(store: ChunkStore, index: LineIndex, chunks: list[int], launch: Launch) -> list[int]:
    """`chunks` not yet committed with a file that matches its checksum (a damaged one is said and redone)."""
    todo = []
    for chunk in chunks:
        first, stop = index.line_range(chunk)
        if store.verified(first) is not None:
            continue
        if first in store.records:
            _say(
                launch,
                f"{store.directory / store.records[first][-1].file} (lines {first}-{stop}) is missing, "
                "truncated or damaged (checksum mismatch): encoding it again",
            )
        todo.append(chunk)
    if len(todo) < len(chunks):
        _say(launch, f"resuming: {len(chunks) - len(todo)} of {len(chunks)} chunks already in {store.directory}")
    return todo


def _load_encoder(args: argparse.Namespace, dtype: Any) -> Any:
    from .encoder import LLM2Vec

    try:
        return LLM2Vec.from_pretrained(
            args.model,
            peft_model_name_or_path=args.peft,
            merge_peft=args.merge_peft,
            enable_bidirectional=not args.causal,
            pooling_mode=args.pooling,
            max_length=args.max_length,
            doc_max_length=args.doc_max_length,
            skip_instruction=False if args.keep_instruction else None,
            attention_backend=args.backend,
            dtype=dtype,
            verbose=args.verbose,
        )
    except (OSError, ValueError) as error:
        raise UsageError(f"could not load model {args.model}: {error}") from None


def _encode(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if args.output is None:
        raise UsageError("expected MODEL INPUT OUTPUT (or --merge DIR OUTPUT)")
    source, target = _check_paths(args)
    _check_numbers(args)
    launch = _launch()
    devices = _devices(args, launch)
    index = index_lines(source, args.chunk_size)
    mine = list(range(launch.rank, index.chunks, launch.world_size))
    texts = {chunk: len(read_chunk(index, chunk)) for chunk in mine}  # validates this rank's lines first
    if launch.world_size > 1:
        _join_group(launch)
    dtype = _dtype(args.dtype, devices[0])
    encoder = _load_encoder(args, dtype)
    store = ChunkStore(_chunk_directory(target), _header(args, index, encoder, dtype), launch.rank, launch.world_size)
    todo = _todo(store, index, mine, launch)
    total = sum(texts[chunk] for chunk in todo)
    progress = tqdm(total=total, desc="Encoding", unit="text", disable=args.no_progress or launch.rank != 0)
    blocks = _encoded_chunks(encoder, index, todo, devices, args, _BatchProgress(progress))
    done = 0
    try:
        with progress:
            for chunk, block in zip(todo, blocks):
                store.commit(*index.line_range(chunk), block)
                done += len(block)
    except KeyboardInterrupt:
        kept = len(store.records)
        if not kept:
            raise Interrupted(f"interrupted after {done} of {total} texts; nothing written") from None
        raise Interrupted(
            f"interrupted after {done} of {total} texts; {kept} of {index.chunks} chunks are kept in "
            f"{store.directory}: run the same command again to resume"
        ) from None
    finally:
        blocks.close()  # stops encoding processes at once
    return _finish(store, target, index, launch)


def _finish(store: ChunkStore, target: Path, index: LineIndex, launch: Launch) -> int:
    """Wait for every rank, then (rank 0) merge the chunks into `target` or check that a ``.chunks`` output is whole."""
    if launch.rank == 0:
        store.ensure_manifest()  # an empty input has no chunk, but the directory still says what it holds
    if launch.world_size > 1:
        import torch.distributed as dist

        try:
            dist.barrier()
        except RuntimeError:
            raise PeerFailed(
                f"another of the {launch.world_size} processes ended before its chunks were done; the chunks "
                f"committed are kept in {store.directory}: run the same command again to resume"
            ) from None
    if launch.rank != 0:
        return 0
    if target.suffix == CHUNKS_SUFFIX:
        plan_merge(store.directory)  # every line covered
        _say(launch, f"{store.directory} holds all {index.chunks} chunks of {index.path} (merge with --merge)")
        return 0
    rows, width = merge(store.directory, target)
    remove_directory(store.directory)
    print(f"wrote {rows} x {width} float32 embeddings to {target}", file=sys.stderr)
    return 0


def _merge_only(args: argparse.Namespace) -> int:
    """``--merge DIR OUTPUT``: one matrix from a complete ``.chunks`` directory, every checksum verified."""
    given = [path for path in (args.model, args.input, args.output) if path is not None]
    if len(given) != 1:
        raise UsageError(f"--merge {args.merge} takes one more argument, the output .npy or .safetensors")
    target = Path(given[0])
    _check_output(target, MATRIX_SUFFIXES)
    rows, width = merge(Path(args.merge), target)
    print(f"wrote {rows} x {width} float32 embeddings to {target}", file=sys.stderr)
    return 0


USAGE = """llm2vec-fast encode MODEL INPUT OUTPUT [options]
       llm2vec-fast encode --merge DIR OUTPUT
       torchrun --nproc-per-node G -m llm2vec_fast.encode_cli MODEL INPUT OUTPUT [options]"""


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="model or MNTP adapter directory (or hub id), as for from_pretrained")
    parser.add_argument("input", nargs="?", help="input .txt (one text per line) or .jsonl")
    parser.add_argument(
        "output", nargs="?", help="output .npy or .safetensors (float32, one row per input), or a .chunks directory"
    )
    parser.add_argument("--merge", metavar="DIR", help="merge the complete .chunks directory DIR into OUTPUT")
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
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=4096,
        help="input lines per committed chunk, the unit of resume (default 4096)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on CUDA, else float32")
    parser.add_argument("--device", default=None, help="device, or a comma-separated list for one process per device")
    parser.add_argument("--backend", choices=("auto", *BACKENDS), help="force an attention backend")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_verbose_flag(parser)
    parser.set_defaults(func=run_encode)


def add_encode_command(subparsers: Any) -> None:
    """Add ``encode`` to an argparse subparsers object (``func`` set to :func:`run_encode`)."""
    parser = subparsers.add_parser(
        "encode",
        help="embed a .txt/.jsonl file into a .npy/.safetensors matrix",
        description=__doc__.split("\n\n")[1],
        usage=USAGE,
    )
    _add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    """``python -m llm2vec_fast.encode_cli`` (and ``torchrun -m llm2vec_fast.encode_cli``): ``encode``'s arguments."""
    parser = argparse.ArgumentParser(prog="llm2vec_fast.encode_cli", description=__doc__.split("\n\n")[1], usage=USAGE)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
