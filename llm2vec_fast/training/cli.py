"""``llm2vec-fast train {mntp,simcse,supervised}``: every config setting is also a flag.

    llm2vec-fast train mntp --config mntp-mistral --train-files wiki.txt --output-dir out/mntp
    llm2vec-fast train simcse --model-name-or-path mistralai/Mistral-7B-Instruct-v0.2 \\
        --peft-model-name-or-path out/mntp --train-files wiki1m.txt --output-dir out/simcse
    torchrun --nproc-per-node 8 -m llm2vec_fast.training.cli supervised --config supervised-e5 ...
    torchrun --nproc-per-node 8 -m llm2vec_fast.training.cli mntp --distributed-strategy fsdp ...

Flags are generated from the config dataclasses by `transformers.HfArgumentParser` (types, choices,
help text and aliases from each field), so they always match what a config file takes; values are
checked by `config.load_config`, which names the bad one.
``--print-config`` shows the resolved settings without training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Any

from transformers import HfArgumentParser

from ..cli_common import add_verbose_flag, report_error
from .config import CONFIG_CLASSES, load_config, preset_names

_HELP = {
    "mntp": "masked next-token prediction (LLM2Vec step 2)",
    "simcse": "unsupervised SimCSE on an MNTP-adapted model (LLM2Vec step 3)",
    "supervised": "supervised contrastive training on (query, positive, negatives) JSONL data",
}


def _nullable(convert: Any) -> Any:
    """`convert`, except that ``none``/``null`` give None (clearing a value a config file set)."""

    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _as_override(action: argparse.Action, hint: Any) -> None:
    """Make a flag HfArgumentParser generated an override: no default (the config file's or the dataclass's value
    stands unless the flag is given), never required (a config file may hold it), JSON for mappings, none for null.

    Choices are shown but checked by `load_config`, whose error is one line naming the setting.
    """
    action.default, action.required = argparse.SUPPRESS, False
    action.option_strings.sort(key=lambda option: "_" in option)  # --max-steps first; --max_steps is accepted too
    action.help = (action.help or "").replace("%", "%%")
    if action.choices is not None:
        action.metavar, action.choices = "{" + ",".join(map(str, action.choices)) + "}", None
    if typing.get_origin(hint) is dict:
        action.type, action.metavar = json.loads, "JSON"
    elif type(None) in typing.get_args(hint) and action.type is not None:
        action.type = _nullable(action.type)


def _setting_flags(cls: type) -> argparse.ArgumentParser:
    """A parser holding one flag per field of config class `cls` (from its types and metadata), to use as a parent."""
    parser = HfArgumentParser(cls, add_help=False)
    hints = typing.get_type_hints(cls)
    for action in parser._actions:
        _as_override(action, hints[action.dest])
    return parser


def _add_objective(subparsers: Any, objective: str) -> None:
    cls = CONFIG_CLASSES[objective]
    defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    epilog = ("defaults: " + ", ".join(f"{name}={value}" for name, value in defaults.items())).replace("%", "%%")
    parser = subparsers.add_parser(
        objective, help=_HELP[objective], description=_HELP[objective], epilog=epilog, parents=[_setting_flags(cls)]
    )
    parser.add_argument(
        "--config",
        metavar="FILE_OR_PRESET",
        help=f"JSON/YAML config file, or a shipped preset: {', '.join(preset_names())}",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    add_verbose_flag(parser)
    parser.set_defaults(func=_run, objective=objective)


def _is_main_process() -> bool:
    """Whether this process speaks for the run (rank 0 under torchrun, or the only process)."""
    return os.environ.get("RANK", "0") == "0"


def _say(command: str, message: str) -> None:
    if _is_main_process():
        print(f"llm2vec-fast {command}: {message}", file=sys.stderr)


def _final_metrics(losses: list[float]) -> str:
    """The last loss and the mean of the last tenth of the run's steps (less noisy than one step)."""
    tail = losses[-max(1, len(losses) // 10) :]
    return f"final loss {losses[-1]:.4f} (mean of the last {len(tail)} steps {sum(tail) / len(tail):.4f})"


def _run(args: argparse.Namespace) -> int:
    from ..loading import quiet_libraries
    from .loop import TrainingInterrupted
    from .objectives import train
    from .process_group import shutdown

    command = f"train {args.objective}"
    names = {f.name for f in dataclasses.fields(CONFIG_CLASSES[args.objective])}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    try:
        config = load_config(args.objective, args.config, overrides)
    except (ValueError, FileNotFoundError) as error:
        return report_error(command, error)
    if config.warmup_steps >= config.max_steps:
        _say(
            command,
            f"warning: warmup_steps ({config.warmup_steps}) >= max_steps ({config.max_steps}): "
            "the learning rate never reaches learning_rate",
        )
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    try:
        with quiet_libraries(args.verbose):
            result = train(config)
    except (ValueError, FileNotFoundError) as error:  # bad data, settings or checkpoints: the message says which
        return report_error(command, error)
    except TrainingInterrupted as interrupted:
        print(f"llm2vec-fast {command}: {interrupted}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the first step or while writing the final outputs
        print(f"llm2vec-fast {command}: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown()
    if result.losses:
        _say(command, f"{_final_metrics(result.losses)}; adapter, checkpoints and loss.png in {result.output_dir}")
    return 0


def add_train_command(subparsers: Any) -> None:
    """Add ``train`` with the ``mntp``, ``simcse`` and ``supervised`` sub-commands to argparse `subparsers`."""
    train_parser = subparsers.add_parser(
        "train",
        help="LLM2Vec conversion training (MNTP, SimCSE, supervised)",
        description="LLM2Vec conversion training on llm2vec_fast kernels",
    )
    objectives = train_parser.add_subparsers(dest="objective", metavar="{mntp,simcse,supervised}", required=True)
    for objective in CONFIG_CLASSES:
        _add_objective(objectives, objective)


def main(argv: list[str] | None = None) -> int:
    """``python -m llm2vec_fast.training.cli {mntp,simcse,supervised} ...`` (what ``llm2vec-fast train`` runs)."""
    parser = argparse.ArgumentParser(prog="llm2vec-fast")
    add_train_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
