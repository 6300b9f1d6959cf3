"""The optimisation loop shared by every objective: accumulation, DDP/FSDP, clipping, schedule, logs, checkpoints.

Each objective supplies a model, a batch source and a function returning a micro-batch's loss
*sum*; the loop divides by the number of loss terms of the whole step across micro-batches and
processes (known before any forward pass), so the update equals that of one process holding the
whole global batch, and the logged loss is that global mean.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import PeftModel
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import get_scheduler

from .checkpoint import TrainingState, list_checkpoints, load_checkpoint, load_weights, save_checkpoint
from .config import TrainConfig
from .data.batches import TokenBatch
from .distributed_strategy import (
    TrainedWeights,
    gather_optimizer_state,
    gather_trained_weights,
    gradient_sync,
    wrap_model,
)
from .loss_log import LossLog
from .process_group import Topology, all_reduce_sum
from .run_directory import ResumePoint

_SCHEDULERS = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}

LossFunction = Callable[[nn.Module, TokenBatch], Tensor]


@dataclass
class TrainingResult:
    """Per-step global mean losses of this run (from its first step, or from the resumed one) and where it saved."""

    losses: list[float]
    output_dir: Path
    last_checkpoint: Path | None


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training. Every completed checkpoint is intact; the message says how to carry on."""

    def __init__(self, step: int, last_checkpoint: Path | None):
        self.step, self.last_checkpoint = step, last_checkpoint
        if last_checkpoint is not None:
            message = f"interrupted at step {step}; resume with --resume latest (from {last_checkpoint.name})"
        else:
            rerun = " with --overwrite-output-dir" if step else ""  # its loss log rows would be refused otherwise
            message = f"interrupted at step {step} before the first checkpoint; start again{rerun}"
        super().__init__(message)


class BatchSource(Protocol):
    """What the loop needs from a data stream (see `data.sources`)."""

    def next_batch(self) -> TokenBatch: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Trainer:
    """Trains `model` on batches from `source` up to step ``max_steps`` (or ``stop_after_steps``, to split a job).

    Args:
        model: computes what `loss_sum` needs; its trainable parameters are the optimised ones.
        adapter: the peft model inside `model` (saved at checkpoints).
        weights_dtype: the dtype the base weights are stored in (FSDP computes 16-bit ones in it).
        resume: the checkpoint to continue from (`run_directory.start_run`), None for a fresh run.
        lm_head: a trained LM head to checkpoint alongside the adapter (MNTP with ``lm_head="train"``).
    """

    def __init__(
        self,
        config: TrainConfig,
        topology: Topology,
        *,
        model: nn.Module,
        adapter: PeftModel,
        source: BatchSource,
        loss_sum: LossFunction,
        weights_dtype: torch.dtype,
        resume: ResumePoint | None,
        lm_head: nn.Module | None = None,
    ):
        self.config, self.topology, self.source, self.loss_sum = config, topology, source, loss_sum
        self.model, self.adapter, self.lm_head = model.train(), adapter, lm_head
        self.output_dir = Path(config.output_dir)
        self.last_step = config.last_step
        self.state = TrainingState(step=0, world_size=topology.world_size, config=config.to_dict())
        if resume is not None:
            load_weights(resume.directory, adapter, lm_head)  # into the whole model, before it is sharded
        self.wrapped = wrap_model(model, config.distributed_strategy, topology, weights_dtype)
        self.params = [p for p in model.parameters() if p.requires_grad]  # after wrapping: FSDP replaces them
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )
        self.scheduler = get_scheduler(
            _SCHEDULERS[config.lr_scheduler],
            self.optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps,
        )
        if resume is not None:
            self._resume(resume)
        resumed_at = self.state.step if resume is not None else None
        self.log = LossLog(self.output_dir, resume_after_step=resumed_at) if topology.is_main else None

    def _resume(self, resume: ResumePoint) -> None:
        data_state = load_checkpoint(
            resume.directory, self.topology, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
        )
        self.state = resume.state
        self.state.config = self.config.to_dict()
        self.source.load_state_dict(data_state)

    def _step(self) -> tuple[float, float, int, int]:
        """One optimizer step: ``(global mean loss, gradient norm before clipping, global loss terms, global
        tokens)``."""
        batches = [self.source.next_batch() for _ in range(self.config.gradient_accumulation_steps)]
        device = self.topology.device
        counts = all_reduce_sum(
            torch.tensor(
                [sum(b.num_loss_terms for b in batches), sum(b.num_tokens for b in batches)],
                dtype=torch.float64,
                device=device,
            )
        )
        terms, tokens = int(counts[0]), int(counts[1])
        scale = self.topology.world_size / max(terms, 1)
        total = torch.zeros((), dtype=torch.float32, device=device)
        for index, batch in enumerate(batches):
            with gradient_sync(self.wrapped, enabled=index == len(batches) - 1):
                loss_sum = self.loss_sum(self.wrapped, batch)
                (loss_sum * scale).backward()
            total += loss_sum.detach().float()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm or float("inf"))
        if isinstance(grad_norm, DTensor):  # FSDP: the norm over every process's shards
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(all_reduce_sum(total)) / max(terms, 1), float(grad_norm), terms, tokens

    def gather_weights(self) -> TrainedWeights:
        """The trained weights as full tensors on rank 0 (collective: every process calls it)."""
        return gather_trained_weights(self.model, self.adapter, self.lm_head)

    def save(self) -> Path:
        return save_checkpoint(
            self.output_dir,
            self.state,
            self.topology,
            adapter=self.adapter,
            weights=self.gather_weights(),
            optimizer_state=gather_optimizer_state(self.model, self.optimizer),
            scheduler=self.scheduler,
            data_state=self.source.state_dict(),
            keep=self.config.save_total_limit,
        )

    def train(self) -> TrainingResult:
        """Run to ``last_step``; Ctrl-C raises `TrainingInterrupted`, leaving every completed checkpoint intact."""
        config = self.config
        if self.topology.is_main:
            print(f"{config.objective}: checkpoints, loss_log.csv and loss.png go to {self.output_dir}")
        progress = tqdm(
            total=config.max_steps,
            initial=self.state.step,
            desc=f"{config.objective} training",
            disable=config.disable_tqdm or not self.topology.is_main,
            dynamic_ncols=True,
        )
        started = time.perf_counter()
        try:
            losses, last_checkpoint = self._run_steps(progress)
        except KeyboardInterrupt:
            found = list_checkpoints(self.output_dir)
            raise TrainingInterrupted(self.state.step, found[-1] if found else None) from None
        finally:
            progress.close()
        if self.topology.is_main and losses:
            elapsed = time.perf_counter() - started
            print(f"{config.objective}: {len(losses)} steps in {elapsed:.1f} s, last loss {losses[-1]:.4f}")
        return TrainingResult(losses, self.output_dir, last_checkpoint)

    def _run_steps(self, progress: tqdm) -> tuple[list[float], Path | None]:
        """The steps up to ``last_step``: their losses and the last checkpoint written."""
        config = self.config
        losses: list[float] = []
        last_checkpoint = None
        while self.state.step < self.last_step:
            step_started = time.perf_counter()
            learning_rate = self.scheduler.get_last_lr()[0]
            loss, grad_norm, terms, tokens = self._step()
            self.state.step += 1
            self.state.tokens_seen += tokens
            losses.append(loss)
            seconds = time.perf_counter() - step_started
            if self.log is not None:
                self.log.append(
                    {
                        "step": self.state.step,
                        "loss": loss,
                        "grad_norm": grad_norm,
                        "learning_rate": learning_rate,
                        "loss_terms": terms,
                        "tokens": tokens,
                        "seconds": round(seconds, 4),
                    }
                )
            progress.update(1)
            progress.set_postfix(
                loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}", tok_s=f"{tokens / max(seconds, 1e-9):.0f}"
            )
            if self.state.step % config.save_steps == 0 or self.state.step == self.last_step:
                last_checkpoint = self.save()
                if self.log is not None:
                    model_name = Path(config.model_name_or_path).name
                    self.log.plot(f"{config.objective} run {self.output_dir.name} ({model_name})")
        return losses, last_checkpoint
