"""Resume and fault safety: paths compared resolved, damaged checkpoints named and skipped, crashes and kill -9
mid-save leave the previous checkpoint usable, finished outputs never silently overwritten, Ctrl-C reported."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_files import write_training_files

import llm2vec_fast.kernels.backend as triton_backend
import llm2vec_fast.training.checkpoint as checkpoint
from llm2vec_fast.training import load_config, train
from llm2vec_fast.training.cli import main
from llm2vec_fast.training.loop import Trainer
from llm2vec_fast.training.loss_log import read_log

STEPS = 6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_training_files(
        tmp_path_factory.mktemp("resume"), "llama", seed=4, text_lines=40, sentences_per_line=2, datasets={}
    )


def _settings(files, output_dir, **settings):
    return {
        **dict(
            model_name_or_path=str(files / "model"),
            train_files=[str(files / "text.txt")],
            output_dir=str(output_dir),
            max_seq_length=32,
            per_device_train_batch_size=4,
            max_steps=STEPS,
            save_steps=2,
            learning_rate=1e-3,
            gradient_checkpointing=False,
            lora_dropout=0.0,
            torch_dtype="float32",
            disable_tqdm=True,
        ),
        **settings,
    }


def _train(files, output_dir, **settings):
    return train(load_config("mntp", None, _settings(files, output_dir, **settings)))


@pytest.fixture(scope="module")
def straight(files, tmp_path_factory):
    """Losses of an uninterrupted run."""
    return _train(files, tmp_path_factory.mktemp("straight") / "out").losses


@pytest.fixture(scope="module")
def stopped(files, tmp_path_factory):
    """A run stopped at step 4, with checkpoints 2 and 4; tests copy it before damaging it."""
    output = tmp_path_factory.mktemp("stopped") / "out"
    _train(files, output, stop_after_steps=4)
    return output


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def _logged_steps(output: Path) -> list[int]:
    return [row["step"] for row in read_log(output / "loss_log.jsonl")]


def test_resume_accepts_the_output_dir_spelled_differently_or_moved(files, straight, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(files / "model", "model")
    shutil.copy(files / "text.txt", "text.txt")

    def config(output_dir, **settings):
        return load_config(
            "mntp",
            None,
            {**_settings(files, output_dir), "model_name_or_path": "model", "train_files": ["text.txt"], **settings},
        )

    train(config("rp", stop_after_steps=2))
    spellings = {3: "./rp", 4: "rp/", 5: str(tmp_path / "rp")}
    for step, spelling in spellings.items():
        resumed = train(
            config(
                spelling,
                stop_after_steps=step,
                resume_from_checkpoint="latest",
                model_name_or_path="./model/",
                train_files=[str(tmp_path / "text.txt")],
            )
        )
        assert resumed.losses == straight[step - 1 : step], spelling
    (tmp_path / "elsewhere").mkdir()
    shutil.move("rp", "elsewhere/moved")
    assert train(config("elsewhere/moved", resume_from_checkpoint="latest")).losses == straight[5:]


def test_written_paths_are_absolute_for_local_files_and_as_given_for_hub_names(files, tmp_path, monkeypatch):
    monkeypatch.chdir(files)
    output = tmp_path / "out"
    train(
        load_config(
            "mntp",
            None,
            {**_settings(files, output, max_steps=2), "model_name_or_path": "model", "train_files": ["text.txt"]},
        )
    )
    base = json.loads((output / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((files / "model").resolve())
    for written in (output / "train_config.json", output / "checkpoint-2" / "trainer_state.json"):
        settings = json.loads(written.read_text())
        settings = settings.get("config", settings)
        assert settings["model_name_or_path"] == base, written
        assert settings["train_files"] == [str((files / "text.txt").resolve())], written
        assert settings["output_dir"] == str(output.resolve()), written
    hub = load_config("mntp", None, {**_settings(files, output), "model_name_or_path": "someone/some-model"})
    assert hub.with_resolved_paths().model_name_or_path == "someone/some-model"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name, damage",
    [
        ("adapter_model.safetensors", _truncate),
        ("adapter_model.safetensors", _flip_a_byte),
        ("optimizer.pt", _empty),
        ("rank0.pt", _truncate),
        ("scheduler.pt", _flip_a_byte),
        ("trainer_state.json", _truncate),
        ("trainer_state.json", _empty),
    ],
)
def test_a_damaged_checkpoint_is_named_and_the_newest_complete_one_resumes(
    files, straight, stopped, tmp_path, name, damage
):
    run = _copy(stopped, tmp_path)
    damage(run / "checkpoint-4" / name)
    with pytest.warns(UserWarning, match=rf"skipping {re.escape(str(run / 'checkpoint-4'))}: .*{name}"):
        resumed = _train(files, run, resume_from_checkpoint="latest")
    assert resumed.losses == straight[2:]
    assert _logged_steps(run) == list(range(1, STEPS + 1))
    damage(run / "checkpoint-4" / name)  # rewritten by the resumed run
    named = rf"{re.escape(str(run / 'checkpoint-4'))}.*{name}"
    with pytest.raises(ValueError, match=named):  # a checkpoint named explicitly is refused, not skipped
        _train(files, tmp_path / "other", resume_from_checkpoint=str(run / "checkpoint-4"))


def test_no_complete_checkpoint_left_is_an_error_naming_what_is_wrong(files, stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    _truncate(run / "checkpoint-4" / "optimizer.pt")
    _empty(run / "checkpoint-2" / "trainer_state.json")
    with pytest.warns(UserWarning, match="skipping"), pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        _train(files, run, resume_from_checkpoint="latest")


def test_a_truncated_last_loss_log_line_is_dropped_on_resume(files, straight, stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    with open(run / "loss_log.jsonl", "a") as handle:
        handle.write('{"step": 5, "loss": 3.1')  # the process died while writing a row
    assert _train(files, run, resume_from_checkpoint="latest").losses == straight[4:]
    assert _logged_steps(run) == list(range(1, STEPS + 1))
    assert [row["loss"] for row in read_log(run / "loss_log.jsonl")] == straight


def test_a_damaged_loss_log_line_before_the_last_is_named(files, stopped, tmp_path):
    run = _copy(stopped, tmp_path)
    lines = (run / "loss_log.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (run / "loss_log.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(run / 'loss_log.jsonl'))}:2: "):
        _train(files, run, resume_from_checkpoint="latest")


def test_a_fresh_run_refuses_to_overwrite_a_finished_one_unless_asked(files, tmp_path):
    output = tmp_path / "out"
    _train(files, output, max_steps=2)
    for old in output.glob("checkpoint-*"):
        shutil.rmtree(old)
    adapter = (output / "adapter_model.safetensors").read_bytes()
    refusal = rf"{re.escape(str(output))} already holds the outputs of a run .*overwrite_output_dir"
    with pytest.raises(ValueError, match=refusal):
        _train(files, output, max_steps=2)
    assert (output / "adapter_model.safetensors").read_bytes() == adapter and _logged_steps(output) == [1, 2]
    _train(files, output, max_steps=2, seed=7, overwrite_output_dir=True)
    assert (output / "adapter_model.safetensors").read_bytes() != adapter


def test_overwriting_removes_the_old_checkpoints(files, tmp_path):
    output = tmp_path / "out"
    _train(files, output, max_steps=4, save_steps=4)
    _train(files, output, max_steps=2, overwrite_output_dir=True)
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]


def _named(path, name: str) -> bool:
    return Path(path).name == name


# Where the save of checkpoint 4 (checkpoint 2 existing, save_total_limit=1) is cut short; which checkpoint survives.
CRASH_POINTS = {
    "writing the optimizer": (
        "torch",
        "save",
        lambda run, args: Path(args[1]).name == "optimizer.pt" and _named(Path(args[1]).parent, "checkpoint-4.tmp"),
        2,
    ),
    "publishing": ("os", "replace", lambda run, args: _named(args[1], "checkpoint-4"), 2),
    "pruning": (
        "shutil",
        "rmtree",
        lambda run, args: Path(args[0]).name.startswith("checkpoint-2") and (run / "checkpoint-4").is_dir(),
        4,
    ),
}


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_during_a_checkpoint_save_leaves_the_previous_one_usable(files, straight, tmp_path, monkeypatch, point):
    run = tmp_path / "run"
    module_name, name, crashes_here, survivor = CRASH_POINTS[point]
    module = {"torch": torch, "os": os, "shutil": shutil}[module_name]
    original = getattr(module, name)

    def crashing(*args, **kwargs):
        if crashes_here(run, args):
            raise SystemExit("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, crashing)
    with pytest.raises(SystemExit, match="simulated crash"):
        _train(files, run, save_total_limit=1, stop_after_steps=4)
    monkeypatch.setattr(module, name, original)
    assert checkpoint.list_checkpoints(run)[-1].name == f"checkpoint-{survivor}"
    (run / "checkpoint-best").mkdir()  # not ours: left alone
    assert _train(files, run, save_total_limit=1, resume_from_checkpoint="latest").losses == straight[survivor:]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-best"]  # no leftovers


def test_only_leftovers_of_interrupted_saves_are_removed(tmp_path):
    names = [
        "checkpoint-4.tmp",
        "checkpoint-2.old",
        "checkpoint-6.deleting",
        "checkpoint-8",
        "checkpoint-best",
        "checkpoint-best.tmp",
    ]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "file").write_text("x")
    checkpoint.remove_unfinished_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-8", "checkpoint-best", "checkpoint-best.tmp"]


KILLED_MID_SAVE = """
import os, signal, sys
import torch
import llm2vec_fast.training.checkpoint as checkpoint
from llm2vec_fast.training import load_config, train

original = torch.save

def killed_mid_write(obj, path, *args, **kwargs):
    if "checkpoint-4" in str(path) and str(path).endswith("optimizer.pt"):
        original(obj, path, *args, **kwargs)
        with open(path, "r+b") as handle:
            handle.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(obj, path, *args, **kwargs)

checkpoint.torch.save = killed_mid_write
train(load_config("mntp", None, __import__("json").loads(sys.argv[1])))
"""


def test_kill_9_in_the_middle_of_a_checkpoint_write_leaves_the_previous_one_usable(files, straight, tmp_path):
    run = tmp_path / "run"
    settings = _settings(files, run, stop_after_steps=4)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_MID_SAVE, json.dumps(settings)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["checkpoint-2"]
    assert _train(files, run, resume_from_checkpoint="latest").losses == straight[2:]
    assert _logged_steps(run) == list(range(1, STEPS + 1))


CLI = [
    "mntp",
    "--max-steps",
    "4",
    "--save-steps",
    "2",
    "--max-seq-length",
    "32",
    "--per-device-train-batch-size",
    "4",
    "--torch-dtype",
    "float32",
    "--no-gradient-checkpointing",
    "--disable-tqdm",
]


def _cli(files, output, *flags):
    return main(
        [*CLI, "--model", str(files / "model"), "--data", str(files / "text.txt"), "--output", str(output), *flags]
    )


def test_ctrl_c_says_where_to_resume_and_exits_130(files, tmp_path, monkeypatch, capsys):
    step = Trainer._step
    calls = []

    def interrupted_at_the_fourth(self):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "_step", interrupted_at_the_fourth)
    assert _cli(files, tmp_path / "out") == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3; resume with --resume latest" in err and "Traceback" not in err
    monkeypatch.setattr(Trainer, "_step", step)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "out")] == ["checkpoint-2"]
    assert _cli(files, tmp_path / "out", "--resume", "latest") == 0
    assert _logged_steps(tmp_path / "out") == [1, 2, 3, 4]


@pytest.mark.parametrize("steps_done, rerun", [(0, []), (1, ["--overwrite-output-dir"])])
def test_ctrl_c_before_the_first_checkpoint_says_how_to_start_again(
    files, tmp_path, monkeypatch, capsys, steps_done, rerun
):
    step = Trainer._step
    calls = []

    def interrupted(self):
        calls.append(1)
        if len(calls) > steps_done:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "_step", interrupted)
    assert _cli(files, tmp_path / "out") == 130
    advice = f"interrupted at step {steps_done} before the first checkpoint; start again"
    assert capsys.readouterr().err.strip().endswith(advice + (" with --overwrite-output-dir" if rerun else ""))
    monkeypatch.setattr(Trainer, "_step", step)
    if rerun:
        assert _cli(files, tmp_path / "out") == 2  # its loss log rows are an earlier run's
    assert _cli(files, tmp_path / "out", *rerun) == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "cuda"], "no CUDA device is available"),
        (["--backend", "triton"], "attention backend 'triton' is not available: no CUDA device"),
    ],
)
def test_cli_refuses_devices_and_backends_this_machine_lacks(files, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(triton_backend, "INTERPRETING", False)
    assert _cli(files, tmp_path / "out", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
