"""How a run starts in its output directory: from a checkpoint that allows it, or fresh in a directory it may claim.

Decided before any model loads. A fresh run refuses a directory holding an earlier run's
checkpoints or outputs (its adapter would be replaced and its loss log emptied, silently)
unless ``overwrite_output_dir`` is set, which removes them first. A resumed run may change only
the settings in `RESUMABLE_CHANGES`; paths are compared resolved (see `config.resolve_paths`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic_files import remove_directory
from ..loading import CONFIG_NAME
from .checkpoint import (
    ADAPTER_FILE,
    LM_HEAD_FILE,
    TrainingState,
    find_checkpoint,
    list_checkpoints,
    remove_unfinished_saves,
)
from .config import TrainConfig, resolve_paths
from .loss_log import JSONL_FILE, LOG_FILES, read_log
from .process_group import Topology, barrier

# Settings that may change when resuming (and max_steps under a constant schedule); others change the trajectory.
# output_dir is where the checkpoint was found: the run directory may have been moved.
RESUMABLE_CHANGES = {
    "resume_from_checkpoint",
    "stop_after_steps",
    "save_steps",
    "save_total_limit",
    "disable_tqdm",
    "validate_data",
    "device",
    "attention_backend",
    "distributed_strategy",
    "output_dir",
    "overwrite_output_dir",
}
TRAIN_CONFIG_FILE = "train_config.json"
# What a finished run leaves beside its checkpoints (the tokenizer files aside: they are the base model's).
FINAL_FILES = (
    ADAPTER_FILE,
    "adapter_config.json",
    LM_HEAD_FILE,
    CONFIG_NAME,
    TRAIN_CONFIG_FILE,
    *LOG_FILES,
    "loss.png",
)


@dataclass
class ResumePoint:
    """A checkpoint whose files passed their checksums and whose settings match this run's."""

    directory: Path
    state: TrainingState


def start_run(config: TrainConfig, topology: Topology) -> ResumePoint | None:
    """The checkpoint to resume from, or None after making `config.output_dir` ready for a fresh run."""
    if topology.is_main:
        remove_unfinished_saves(Path(config.output_dir))
    barrier()
    if config.resume_from_checkpoint:
        directory, state = find_checkpoint(Path(config.output_dir), config.resume_from_checkpoint)
        check_resumable(directory, state, config, topology.world_size)
        return ResumePoint(directory, state)
    claim_output_dir(Path(config.output_dir), config.overwrite_output_dir, topology)
    return None


def check_resumable(directory: Path, saved: TrainingState, config: TrainConfig, world_size: int) -> None:
    """Raise ValueError unless this run may continue from checkpoint `directory` (state `saved`)."""
    current = resolve_paths(config.to_dict())
    previous = resolve_paths(saved.config)
    resumable = RESUMABLE_CHANGES | ({"max_steps"} if current["lr_scheduler"] == "constant" else set())
    changed = _changed_settings(previous, current, resumable)
    if changed:
        details = "; ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise ValueError(f"cannot resume from {directory}: settings differ from the checkpoint's ({details})")
    if saved.world_size != world_size:
        raise ValueError(
            f"{directory} was written by {saved.world_size} process(es) but this run has "
            f"{world_size}; an exact resume needs the same number of processes"
        )
    if saved.step >= config.last_step:
        raise ValueError(f"{directory} is at step {saved.step}: nothing left to train before step {config.last_step}")


def _changed_settings(previous: dict[str, Any], current: dict[str, Any], resumable: set[str]) -> list[str]:
    return sorted(k for k in set(previous) | set(current) if k not in resumable and previous.get(k) != current.get(k))


def earlier_run(output_dir: Path) -> list[Path]:
    """The checkpoints and outputs of an earlier run in `output_dir` (loss logs without a row are no trace of one)."""
    logged = bool(read_log(output_dir / JSONL_FILE))
    found = list_checkpoints(output_dir)
    for name in FINAL_FILES:
        path = output_dir / name
        if path.is_file() and (logged or name not in LOG_FILES):
            found.append(path)
    return found


def claim_output_dir(output_dir: Path, overwrite: bool, topology: Topology) -> None:
    """Refuse an `output_dir` holding an earlier run unless `overwrite`: then delete its checkpoints and outputs."""
    earlier = earlier_run(output_dir)
    if earlier and not overwrite:
        if list_checkpoints(output_dir):
            raise ValueError(
                f"{output_dir} already holds checkpoints: resume with resume_from_checkpoint='latest' "
                "(--resume latest), replace them with overwrite_output_dir=True (--overwrite-output-dir) "
                "or choose another output_dir"
            )
        names = ", ".join(path.name for path in earlier)
        raise ValueError(
            f"{output_dir} already holds the outputs of a run ({names}): replace them with "
            "overwrite_output_dir=True (--overwrite-output-dir) or choose another output_dir"
        )
    if earlier and topology.is_main:
        for path in earlier:
            if path.is_dir():
                remove_directory(path)
            else:
                path.unlink()
    barrier()
