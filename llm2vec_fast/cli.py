"""The ``llm2vec-fast`` command: ``demo``, ``encode`` and ``train {mntp,simcse,supervised}``.

Only the subcommand being run is imported (and so torch and transformers only when a command needs them):
``llm2vec-fast --help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# subcommand: (module, function adding it to argparse subparsers, one-line help)
COMMANDS = {
    "demo": (".demo", "add_demo_command", "encode a few sentences with an embedded tiny model"),
    "encode": (".encode_cli", "add_encode_command", "embed a .txt/.jsonl file into a .npy/.safetensors matrix"),
    "train": (".training.cli", "add_train_command", "LLM2Vec conversion training (MNTP, SimCSE, supervised)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with `command` (None: every subcommand) complete and the others listed by name and help only."""
    parser = argparse.ArgumentParser(
        prog="llm2vec-fast",
        description="Turn decoder-only LLMs into text encoders on fused bidirectional flash attention.",
    )
    parser.add_argument("--version", action="version", version=f"llm2vec-fast {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module, adder, help_text) in COMMANDS.items():
        if command in (None, name):
            getattr(importlib.import_module(module, __package__), adder)(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else ""
    args = build_parser(command).parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
