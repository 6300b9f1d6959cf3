"""How the model is spread over processes: DDP replicas or FSDP2 shards, and their full (unsharded) states.

- ``"ddp"``: every process holds the whole model; gradients are all-reduced (`DistributedDataParallel`).
- ``"fsdp"``: every decoder layer, then the rest of the model, is sharded across the processes
  with FSDP2 (`fully_shard`): each process keeps 1/N of every weight, gradient and optimizer
  state, and a layer's weights are gathered only while it runs. Weights stored in bfloat16 or
  float16 are computed in that dtype (LoRA included) with gradients reduced in float32.

Both reduce gradients as a mean over processes, so the loop's loss scaling is the same for both.
Checkpoints use one format for both: the trainable weights and the optimizer state gathered to
full tensors on rank 0 (`torch.distributed.checkpoint.state_dict`), keyed by parameter name.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..hf.patching import attention_layers
from .process_group import Topology

Strategy = Literal["ddp", "fsdp"]

# Full tensors on the CPU of rank 0 only (other ranks get empty dicts); frozen weights are not gathered.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def check_launcher(strategy: Strategy) -> None:
    """Refuse ``accelerate launch`` settings this trainer would otherwise ignore: it only takes the processes from
    accelerate."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ValueError(
            "accelerate launch is configured for DeepSpeed, which this trainer does not use; launch without it "
            "and choose distributed_strategy 'ddp' or 'fsdp'"
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and strategy != "fsdp":
        raise ValueError(
            f"accelerate launch is configured for FSDP but distributed_strategy is {strategy!r}: pass "
            "--distributed-strategy fsdp (the trainer shards the model itself; accelerate's FSDP options are not read)"
        )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks that hold an attention layer (``LlamaDecoderLayer``, ...): FSDP's units of sharding."""
    attention = {id(layer) for layer in attention_layers(model)}
    return [module for module in model.modules() if any(id(child) in attention for child in module.children())]


def shard_model(model: nn.Module, device: torch.device, weights_dtype: torch.dtype) -> nn.Module:
    """Shard each decoder layer of `model`, then `model` itself, over all processes (in place; FSDP2).

    Call before building the optimizer: sharding replaces the parameters. Weights stored in a
    16-bit dtype are gathered and computed in it, gradients reduced in float32; float32 stays float32.
    """
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"found no decoder layer to shard in {type(model).__name__}")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if weights_dtype in (torch.bfloat16, torch.float16):
        policy = MixedPrecisionPolicy(param_dtype=weights_dtype, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def wrap_model(model: nn.Module, strategy: Strategy, topology: Topology, weights_dtype: torch.dtype) -> nn.Module:
    """The module the training loop calls: `model` sharded (fsdp), replicated (ddp), or as is (one process).

    With ``"fsdp"`` and no process group (a single process not started by a launcher) there is
    nothing to shard: `model` trains unwrapped, exactly as ``"ddp"`` would, and a warning says so.
    """
    if strategy == "fsdp":
        if dist.is_available() and dist.is_initialized():
            return shard_model(model, topology.device, weights_dtype)
        warnings.warn(
            "distributed_strategy='fsdp' in a single process (no torchrun/accelerate launch): "
            "nothing to shard, the model trains unsharded",
            stacklevel=2,
        )
        return model
    if strategy != "ddp":
        raise ValueError(f"distributed_strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    return DistributedDataParallel(model) if topology.is_distributed else model


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce gradients across processes in this backward pass only if `enabled` (off for all but the last
    micro-batch)."""
    if isinstance(wrapped, FSDPModule):
        wrapped.set_requires_gradient_sync(enabled)
        yield
    elif isinstance(wrapped, DistributedDataParallel) and not enabled:
        with wrapped.no_sync():
            yield
    else:
        yield


@dataclass
class TrainedWeights:
    """The trainable weights as full CPU tensors (on rank 0; empty elsewhere when several processes run)."""

    adapter: dict[
        str, Tensor
    ]  # named as in the peft model's own state_dict (``base_model.model....lora_A.default.weight``)
    lm_head: Tensor | None


def _prefix(root: nn.Module, module: nn.Module) -> str:
    if module is root:
        return ""
    name = next((n for n, m in root.named_modules() if m is module), None)
    if name is None:
        raise ValueError(f"{type(module).__name__} is not part of {type(root).__name__}")
    return name + "."


def gather_trained_weights(model: nn.Module, adapter: nn.Module, lm_head: nn.Module | None) -> TrainedWeights:
    """Unsharded trainable weights of `model` split into `adapter`'s and `lm_head`'s (collective: every process
    calls it)."""
    state = get_model_state_dict(model, options=_GATHER)
    adapter_prefix = _prefix(model, adapter)
    head = state.get(_prefix(model, lm_head) + "weight") if lm_head is not None else None
    weights = {name[len(adapter_prefix) :]: tensor for name, tensor in state.items() if name.startswith(adapter_prefix)}
    return TrainedWeights(weights, head)


def gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state as full tensors keyed by parameter name (collective; filled on rank 0)."""
    return get_optimizer_state_dict(model, optimizer, options=_GATHER)


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Give `optimizer` the full `state` of `gather_optimizer_state`, each process keeping its shard (collective)."""
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
