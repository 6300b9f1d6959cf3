"""Training configs: paper defaults, presets, and clear errors for bad files, keys and values; the CLI's flags."""

import argparse
import dataclasses
import json

import pytest

from llm2vec_fast.training.cli import add_train_command, main
from llm2vec_fast.training.config import CONFIG_CLASSES, MNTPConfig, load_config, preset_names

REQUIRED = {"model_name_or_path": "m", "train_files": ["data.txt"], "output_dir": "out"}


def test_defaults_are_the_papers():
    mntp = load_config("mntp", None, REQUIRED)
    assert (mntp.per_device_train_batch_size, mntp.max_seq_length, mntp.learning_rate, mntp.max_steps) == (
        32,
        512,
        5e-5,
        1000,
    )
    assert (mntp.lora_r, mntp.lora_alpha, mntp.lora_dropout) == (16, 32, 0.05)
    assert mntp.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert mntp.mask_token_type == "blank" and mntp.lm_head == "freeze" and mntp.data_layout == "concat"
    simcse = load_config("simcse", None, REQUIRED)
    assert (simcse.loss_scale, simcse.simcse_dropout, simcse.per_device_train_batch_size, simcse.max_seq_length) == (
        20.0,
        0.3,
        128,
        128,
    )
    assert simcse.learning_rate == 3e-5
    supervised = load_config("supervised", None, REQUIRED)
    assert (supervised.loss_scale, supervised.per_device_train_batch_size, supervised.learning_rate) == (50.0, 64, 2e-4)
    assert supervised.warmup_steps == 300 and supervised.pooling_mode == "mean"


@pytest.mark.parametrize(
    "model_type, expected", [("mistral", (0.8, "all_mask")), ("llama", (0.2, "default")), ("qwen2", (0.2, "default"))]
)
def test_mntp_masking_defaults_follow_the_model_family(model_type, expected):
    assert load_config("mntp", None, REQUIRED).masking_for(model_type) == expected
    explicit = load_config("mntp", None, {**REQUIRED, "mlm_probability": 0.3, "data_collator_type": "default"})
    assert explicit.masking_for(model_type) == (0.3, "default")


def test_presets_load_with_their_paper_values():
    assert set(preset_names()) >= {"mntp-llama", "mntp-mistral", "simcse", "supervised-e5"}
    mistral = load_config("mntp", "mntp-mistral", REQUIRED)
    assert mistral.masking_for("mistral") == (0.8, "all_mask")
    assert load_config("mntp", "mntp-llama", REQUIRED).masking_for("llama") == (0.2, "default")
    e5 = load_config("supervised", "supervised-e5", REQUIRED)
    assert len(e5.instructions) == 14 and isinstance(e5.instructions["allnli"], list)
    with pytest.raises(ValueError, match="objective 'mntp', not 'simcse'"):
        load_config("simcse", "mntp-llama", REQUIRED)


def test_file_then_overrides_take_precedence(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**REQUIRED, "learning_rate": 1e-4, "max_steps": 10}))
    config = load_config("mntp", str(path), {"max_steps": 20})
    assert isinstance(config, MNTPConfig) and config.learning_rate == 1e-4 and config.max_steps == 20


def test_yaml_configs(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: m\ntrain_files: [a.txt]\noutput_dir: out\nlora_r: 8\n")
    assert load_config("mntp", str(path)).lora_r == 8


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"learning_rate": 1e-4,}', r"invalid JSON at line 1"),
        ("[1, 2]", r"must be a mapping"),
        ('{"lerning_rate": 1e-4}', r"unknown setting 'lerning_rate'.*did you mean 'learning_rate'"),
        ('{"max_steps": "ten"}', r"'max_steps' must be an integer, got 'ten'"),
        ('{"max_steps": 0}', r"'max_steps' must be positive"),
        ('{"lora_dropout": 1.5}', r"'lora_dropout' must be in \[0, 1\)"),
        ('{"mlm_probability": 0}', r"'mlm_probability' must be in \(0, 1\]"),
        ('{"mask_token_type": "star"}', r"'mask_token_type' must be one of 'blank', 'eos', 'mask'"),
        ('{"gradient_checkpointing": "yes"}', r"'gradient_checkpointing' must be true or false"),
        ('{"train_files": []}', r"'train_files' must be at least one file"),
    ],
)
def test_bad_config_files_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        load_config("mntp", str(path), {k: v for k, v in REQUIRED.items()})
    assert str(path) in str(error.value) or "line" in str(error.value)


def test_missing_required_settings_and_files():
    with pytest.raises(ValueError, match="missing required setting.*output_dir"):
        load_config("simcse", None, {"model_name_or_path": "m", "train_files": ["a"]})
    with pytest.raises(FileNotFoundError, match="neither a file nor a preset"):
        load_config("simcse", "no-such-preset", REQUIRED)
    with pytest.raises(ValueError, match="'text_template' must be a string holding"):
        load_config("supervised", None, {**REQUIRED, "text_template": "[INST] [/INST]"})


def test_cli_flags_mirror_the_config(capsys):
    assert (
        main(
            [
                "mntp",
                "--model",
                "m",
                "--data",
                "a.txt",
                "b.txt",
                "--output",
                "o",
                "--no-gradient-checkpointing",
                "--max-tokens-per-batch",
                "4096",
                "--lora-target-modules",
                "q_proj",
                "v_proj",
                "--print-config",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["train_files"] == ["a.txt", "b.txt"] and printed["gradient_checkpointing"] is False
    assert printed["max_tokens_per_batch"] == 4096 and printed["lora_target_modules"] == ["q_proj", "v_proj"]
    assert (
        main(
            [
                "supervised",
                "--model",
                "m",
                "--data",
                "d",
                "--output",
                "o",
                "--instructions",
                '{"nq": "Find it"}',
                "--print-config",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["instructions"] == {"nq": "Find it"}
    assert main(["simcse", "--model", "m", "--data", "d", "--output", "o", "--loss-scale", "-1"]) == 2
    assert "'loss_scale' must be positive" in capsys.readouterr().err


@pytest.mark.parametrize("objective", ["mntp", "simcse", "supervised"])
def test_cli_help(objective, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([objective, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--learning-rate" in text and "--train-files" in text and "defaults:" in text


@pytest.mark.parametrize("objective", ["mntp", "simcse", "supervised"])
def test_cli_help_comes_from_each_fields_metadata(objective, capsys):
    with pytest.raises(SystemExit):
        main([objective, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for field in dataclasses.fields(CONFIG_CLASSES[objective]):
        assert "--" + field.name.replace("_", "-") in text
        assert " ".join(field.metadata.get("help", "").split()) in text, field.name
    assert "--resume RESUME_FROM_CHECKPOINT" in text and "{constant,linear,cosine}" in text


def test_cli_none_clears_a_file_value_and_bad_choices_are_one_line_errors(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**REQUIRED, "stop_after_steps": 5, "data_collator_type": "all_mask", "max_steps": 9}))
    assert (
        main(
            [
                "mntp",
                "--config",
                str(path),
                "--stop-after-steps",
                "none",
                "--data-collator-type",
                "null",
                "--print-config",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["stop_after_steps"] is None and printed["data_collator_type"] is None and printed["max_steps"] == 9
    assert main(["mntp", "--config", str(path), "--lr-scheduler", "step"]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip() == "llm2vec-fast train mntp: error: command line: 'lr_scheduler' must be one of 'constant', "
        "'linear', 'cosine', got 'step'"
    )


def test_add_train_command_builds_the_subcommands():
    parser = argparse.ArgumentParser()
    add_train_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "simcse", "--model", "m", "--data", "d", "--output", "o"])
    assert args.objective == "simcse" and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "pretrain"])
