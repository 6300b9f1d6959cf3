"""Checkpoints that resume a run exactly: weights, optimizer, schedule, random state and data position.

Layout of ``<output_dir>/checkpoint-<step>/``:
- ``adapter_config.json``, ``adapter_model.safetensors``: the LoRA adapter (usable as is);
- ``lm_head.safetensors``: MNTP's LM head, only when it is trained;
- ``optimizer.pt``: the full (unsharded) optimizer state keyed by parameter name, the same under
  DDP and FSDP (see `distributed_strategy`); ``scheduler.pt``: the learning-rate schedule;
- ``rank<r>.pt``: process `r`'s torch CPU/CUDA random state and its data-stream position;
- ``trainer_state.json``: step, process count, the run's config and the SHA-256 of every other
  file; written last, so a directory without it is an interrupted save and is ignored.
A checkpoint is written to ``checkpoint-<step>.tmp`` and renamed when complete, so a crash or
kill -9 mid-save leaves the previous checkpoints as they were. On resume every file is checked
against its checksum: a damaged checkpoint is named and skipped for the newest intact one.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ..atomic_files import LEFTOVER_SUFFIXES, TEMPORARY_SUFFIX, publish_directory, remove_directory, sha256
from .distributed_strategy import TrainedWeights, load_optimizer_state
from .process_group import Topology, barrier

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter_model.safetensors"
LM_HEAD_FILE = "lm_head.safetensors"


@dataclass
class TrainingState:
    """What besides weights a checkpoint restores."""

    step: int
    world_size: int
    config: dict[str, Any]
    tokens_seen: int = 0


class CheckpointError(ValueError):
    """A checkpoint that is incomplete or damaged; the message names the file."""


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(directory: Path, adapter: PeftModel, weights: TrainedWeights) -> None:
    """The adapter as peft saves it (``adapter_model.safetensors`` + config) and the trained LM head, from full
    tensors."""
    adapter.save_pretrained(directory, save_embedding_layers=False, state_dict=weights.adapter)
    if weights.lm_head is not None:
        save_file({"weight": weights.lm_head.contiguous()}, str(directory / LM_HEAD_FILE))


def save_checkpoint(
    output_dir: Path,
    state: TrainingState,
    topology: Topology,
    *,
    adapter: PeftModel,
    weights: TrainedWeights,
    optimizer_state: dict[str, Any],
    scheduler: Any,
    data_state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write checkpoint ``state.step`` (collective: every process calls it) and prune old ones to `keep`.

    `weights` and `optimizer_state` are the full states gathered to rank 0 (`distributed_strategy`), which writes them.
    """
    final = output_dir / f"{PREFIX}{state.step}"
    staging = final.with_name(final.name + TEMPORARY_SUFFIX)
    if topology.is_main:
        remove_directory(staging)
        staging.mkdir(parents=True)
    barrier()
    torch.save({"rng": _rng_state(), "data": data_state}, staging / f"rank{topology.rank}.pt")
    if topology.is_main:
        save_weights(staging, adapter, weights)
        torch.save(optimizer_state, staging / "optimizer.pt")
        torch.save(scheduler.state_dict(), staging / "scheduler.pt")
    barrier()
    if topology.is_main:
        _write_state(staging, state)
        publish_directory(staging, final)
        if keep is not None:
            for old in list_checkpoints(output_dir)[:-keep]:
                remove_directory(old)
    barrier()
    return final


def _write_state(directory: Path, state: TrainingState) -> None:
    """``trainer_state.json`` with the checksum of every file already in `directory`: the mark of a complete save."""
    checksums = {file.name: sha256(file) for file in sorted(directory.iterdir())}
    (directory / STATE_FILE).write_text(json.dumps({**state.__dict__, "checksums": checksums}, indent=2))


def remove_unfinished_saves(output_dir: Path) -> None:
    """Delete what saves cut short by a crash left behind (``checkpoint-<step>.tmp`` and the like), never a
    checkpoint."""
    for path in Path(output_dir).glob(f"{PREFIX}*"):
        stem, suffix = os.path.splitext(path.name)
        if path.is_dir() and suffix in LEFTOVER_SUFFIXES and stem[len(PREFIX) :].isdigit():
            remove_directory(path)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest first."""
    found = []
    for path in Path(output_dir).glob(f"{PREFIX}*"):
        suffix = path.name[len(PREFIX) :]
        if suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def find_checkpoint(output_dir: Path, requested: str) -> tuple[Path, TrainingState]:
    """`requested` as a checkpoint directory, or the newest intact one in `output_dir` for ``"latest"``, and its state.

    With ``"latest"`` a damaged checkpoint is skipped with a warning naming the file; one named
    explicitly is refused (`CheckpointError`).
    """
    if requested == "latest":
        for directory in reversed(list_checkpoints(output_dir)):
            try:
                return directory, read_state(directory)
            except CheckpointError as error:
                warnings.warn(f"skipping {directory}: {error}", stacklevel=2)
        raise FileNotFoundError(f"resume_from_checkpoint='latest' but {output_dir} holds no complete checkpoint")
    path = Path(requested)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    return path, read_state(path)


def read_state(directory: Path) -> TrainingState:
    """The checkpoint's training state, once every file it lists matches its checksum (else `CheckpointError`)."""
    path = directory / STATE_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        checksums = dict(saved.pop("checksums"))
        state = TrainingState(**saved)
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as error:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"{path} is unreadable or incomplete ({type(error).__name__}: {error})") from None
    for name, expected in checksums.items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        if sha256(file) != expected:
            raise CheckpointError(f"{file} does not match its checksum in {STATE_FILE}: truncated or damaged")
    return state


def load_weights(directory: Path, adapter: PeftModel, lm_head: torch.nn.Module | None) -> None:
    """Put the checkpoint's adapter (and LM head) into the unsharded model, before it is wrapped for training."""
    device = next(adapter.parameters()).device
    result = set_peft_model_state_dict(adapter, load_file(str(directory / ADAPTER_FILE), device=str(device)))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{directory / ADAPTER_FILE} holds weights this model lacks: {result.unexpected_keys[:5]}")
    if lm_head is not None:
        with torch.no_grad():
            lm_head.weight.copy_(load_file(str(directory / LM_HEAD_FILE))["weight"])


def load_checkpoint(
    directory: Path,
    topology: Topology,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore the optimizer (over `model`, sharded or not), the schedule and this process's random state.

    Returns this process's data position. Weights come first, with `load_weights`; the directory
    comes from `find_checkpoint`, which has checked its files.
    """
    load_optimizer_state(
        model, optimizer, torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
    )
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
    rank_state = torch.load(directory / f"rank{topology.rank}.pt", weights_only=True)
    _restore_rng(rank_state["rng"])
    return rank_state["data"]
