"""The ``llm2vec-fast`` command's habits: ``--version``, a ``--help`` that imports nothing heavy, one error style
across subcommands, quiet loading unless ``--verbose``, and the warmup warning."""

from __future__ import annotations

import io
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

import llm2vec_fast
from llm2vec_fast.cli import COMMANDS, build_parser, main
from llm2vec_fast.encoder import LLM2Vec
from llm2vec_fast.tiny import build_tiny_model

MODEL = Path(__file__).parent / "data" / "llm2vec_oracle" / "mistral"
ERROR_LINE = r"llm2vec-fast {command}: error: [^\n]+\n"


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"llm2vec-fast {llm2vec_fast.__version__}\n"


def test_help_and_version_import_neither_torch_nor_transformers() -> None:
    probe = (
        "import sys\n"
        "from llm2vec_fast.cli import main\n"
        "for argv in (['--help'], ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('IMPORTED', sorted(m for m in ('torch', 'transformers', 'numpy', 'triton') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "{demo,encode,train}" in out and f"llm2vec-fast {llm2vec_fast.__version__}" in out
    assert out.splitlines()[-1] == "IMPORTED []"


def _listed_commands(parser) -> dict[str, str]:
    (subparsers,) = [action for action in parser._actions if action.dest == "command"]
    return {choice.dest: choice.help for choice in subparsers._choices_actions}


def test_top_level_help_lists_each_command_as_its_own_parser_describes_it() -> None:
    """The one-line helps in cli.COMMANDS (shown without importing the commands) match what each command says."""
    listed = _listed_commands(build_parser(""))
    assert listed == _listed_commands(build_parser()) and set(listed) == set(COMMANDS) == {"demo", "encode", "train"}


def test_exports_still_load_on_first_use() -> None:
    assert llm2vec_fast.LLM2Vec is LLM2Vec and callable(llm2vec_fast.flash_attn_func)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        llm2vec_fast.nothing  # noqa: B018


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("encode", ["encode", str(MODEL), "missing.txt", "out.npy"]),
        ("train mntp", ["train", "mntp", "--model", "m", "--data", "d", "--output", "o", "--max-steps", "0"]),
        ("train simcse", ["train", "simcse", "--config", "no-such-preset"]),
    ],
)
def test_every_subcommand_reports_errors_in_one_style(command: str, argv: list[str], capsys) -> None:
    assert main(argv) == 2
    assert re.fullmatch(ERROR_LINE.format(command=command), capsys.readouterr().err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_demo_errors_in_the_same_style(capsys) -> None:
    assert main(["demo", "--device", "cuda"]) == 2
    assert re.fullmatch(ERROR_LINE.format(command="demo"), capsys.readouterr().err)


def test_warmup_not_shorter_than_the_run_is_a_warning(capsys) -> None:
    argv = ["train", "simcse", "--model", "m", "--data", "d", "--output", "o", "--print-config"]
    assert main([*argv, "--max-steps", "10", "--warmup-steps", "10"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["warmup_steps"] == 10
    assert captured.err == (
        "llm2vec-fast train simcse: warning: warmup_steps (10) >= max_steps (10): "
        "the learning rate never reaches learning_rate\n"
    )
    assert main([*argv, "--max-steps", "10", "--warmup-steps", "9"]) == 0
    assert capsys.readouterr().err == ""


@pytest.fixture(scope="module")
def causal_lm_directory(tmp_path_factory) -> Path:
    """A tiny causal LM checkpoint: loading it as a base model gives transformers' LOAD REPORT (lm_head unused)."""
    directory = tmp_path_factory.mktemp("causal_lm")
    model, tokenizer = build_tiny_model("llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def transformers_log():
    """What transformers logs during the test (its own handler holds the stderr of import time, which pytest's
    capture does not see)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("transformers").addHandler(handler)
    yield stream
    logging.getLogger("transformers").removeHandler(handler)


def test_loading_is_quiet_unless_verbose_and_leaves_the_settings_as_they_were(
    causal_lm_directory, capfd, transformers_log
) -> None:
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    LLM2Vec.from_pretrained(str(causal_lm_directory))
    assert capfd.readouterr().err == "" and transformers_log.getvalue() == ""
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (verbosity, bars)
    LLM2Vec.from_pretrained(str(causal_lm_directory), verbose=True)
    assert "Loading weights" in capfd.readouterr().err and "LOAD REPORT" in transformers_log.getvalue()


@pytest.mark.parametrize("verbose", [False, True])
def test_encode_command_is_quiet_unless_verbose(
    causal_lm_directory, tmp_path: Path, capfd, transformers_log, verbose: bool
) -> None:
    source = tmp_path / "in.txt"
    source.write_text("one\ntwo\n")
    target = tmp_path / "out.npy"
    assert (
        main(["encode", str(causal_lm_directory), str(source), str(target), "--no-progress"] + ["--verbose"] * verbose)
        == 0
    )
    err = capfd.readouterr().err
    assert ("LOAD REPORT" in transformers_log.getvalue()) is verbose and ("Loading weights" in err) is verbose
    assert err.endswith(f"wrote 2 x 64 float32 embeddings to {target}\n")
