"""What every ``llm2vec-fast`` subcommand shares: one error style, the ``--verbose`` switch; nothing heavy imported."""

from __future__ import annotations

import argparse
import sys

USAGE_ERROR = 2  # argparse's exit status for a bad command line


def report_error(command: str, message: object) -> int:
    """Print ``llm2vec-fast <command>: error: <message>`` on stderr (one line, no traceback); the exit status 2."""
    print(f"llm2vec-fast {command}: error: {message}", file=sys.stderr)
    return USAGE_ERROR


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose", action="store_true", help="show transformers' load reports, progress bars and warnings"
    )
