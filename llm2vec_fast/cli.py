"""The ``llm2vec-fast`` command: ``demo``, ``encode`` and ``train {mntp,simcse,supervised}``."""

from __future__ import annotations

import argparse
import sys

from .demo import add_demo_command
from .encode_cli import add_encode_command
from .training.cli import add_train_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm2vec-fast",
        description="Turn decoder-only LLMs into text encoders on fused bidirectional flash attention.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{demo,encode,train}")
    add_demo_command(subparsers)
    add_encode_command(subparsers)
    add_train_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
