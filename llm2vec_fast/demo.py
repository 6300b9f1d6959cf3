"""``llm2vec-fast demo``: the encoder end to end on an embedded tiny model, in seconds, no downloads.

Builds a tiny random decoder (``llm2vec_fast.tiny``) in a temporary directory, loads it with
``LLM2Vec.from_pretrained`` (bidirectional, on our attention), embeds a few sentences with and
without instructions, and prints the cosine similarity matrix, the attention backend that ran and
the encoding speed. The weights are random, so the similarities only show the plumbing works.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

from .cli_common import add_verbose_flag, report_error
from .pooling import POOLING_MODES
from .tiny import FAMILIES

DEMO_INPUTS: list[str | list[str]] = [
    "A man is playing a guitar on the street.",
    "Someone plays music outside.",
    "The quick brown fox jumps over the lazy dog.",
    ["Retrieve documents that answer the question:", "What is the capital of France?"],
    ["Retrieve documents that answer the question:", "Paris is the capital of France."],
]


def _label(item: str | list[str]) -> str:
    return item if isinstance(item, str) else f"{item[1]}  (instruction: {item[0]!r})"


def _attention_backend(encoder: Any, device: str) -> str:
    import torch

    from .backends import resolve_backend

    config = encoder.model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dtype = next(encoder.model.parameters()).dtype
    q = torch.zeros(1, 1, config.num_attention_heads, head_dim, device=device, dtype=dtype)
    k = torch.zeros(1, 1, config.num_key_value_heads, head_dim, device=device, dtype=dtype)
    return resolve_backend(q, k)


def run_demo(args: argparse.Namespace) -> int:
    from .loading import quiet_libraries
    from .runtime import check_device

    try:
        device = str(check_device(args.device))
    except (TypeError, ValueError) as error:
        return report_error("demo", error)
    with quiet_libraries(args.verbose):
        return _demo(args, device)


def _demo(args: argparse.Namespace, device: str) -> int:
    import torch

    from .encoder import LLM2Vec
    from .tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as directory:
        model, tokenizer = build_tiny_model(args.family)
        model.model.save_pretrained(directory)  # the base decoder, what LLM2Vec loads
        tokenizer.save_pretrained(directory)
        encoder = LLM2Vec.from_pretrained(directory, pooling_mode=args.pooling, verbose=args.verbose)
    encoder.encode(DEMO_INPUTS, show_progress_bar=False, device=device)  # warm-up
    start = time.perf_counter()
    embeddings = encoder.encode(DEMO_INPUTS, show_progress_bar=False, device=device)
    seconds = time.perf_counter() - start
    tokens = sum(encoder.token_lengths(DEMO_INPUTS))
    normalized = torch.nn.functional.normalize(embeddings, dim=-1)
    similarity = normalized @ normalized.T

    hidden = encoder.model.config.hidden_size
    print(f"tiny random {args.family} model (hidden {hidden}), bidirectional, pooling={encoder.pooling_mode}")
    print(f"attention backend: {_attention_backend(encoder, device)} on {device}")
    print("cosine similarity:")
    for row, item in enumerate(DEMO_INPUTS):
        values = " ".join(f"{v:6.3f}" for v in similarity[row].tolist())
        print(f"  {row}  {values}   {_label(item)}")
    speed = tokens / seconds
    print(f"encoded {len(DEMO_INPUTS)} texts ({tokens} tokens) in {seconds * 1e3:.1f} ms: {speed:,.0f} tokens/s")
    return 0


def add_demo_command(subparsers: Any) -> None:
    """Add ``demo`` to an argparse subparsers object (``func`` set to :func:`run_demo`)."""
    parser = subparsers.add_parser(
        "demo", help="encode a few sentences with an embedded tiny model", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("--family", default="llama", choices=FAMILIES)
    parser.add_argument("--pooling", default="mean", choices=POOLING_MODES)
    parser.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    add_verbose_flag(parser)
    parser.set_defaults(func=run_demo)
