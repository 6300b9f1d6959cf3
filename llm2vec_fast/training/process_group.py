"""Process-group plumbing for multi-GPU (and multi-process CPU) training.

Launched by ``torchrun`` or ``accelerate launch``, each process reads ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` from the environment and joins one group (NCCL on GPUs, Gloo on CPU). Without
those variables everything degrades to a single process and the collectives are no-ops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..runtime import check_device


@dataclass(frozen=True)
class Topology:
    """Where this process sits: its rank among `world_size` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_topology(device: str | None = None) -> Topology:
    """Join the process group that the launcher described (if any) and pick this process's device.

    Args:
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available). With several processes on
            CUDA, process ``LOCAL_RANK`` uses GPU ``LOCAL_RANK``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    requested = check_device(device)
    if requested.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    use_cuda = requested.type == "cuda"
    if use_cuda:
        index = local_rank if world_size > 1 else requested.index or 0
        torch.cuda.set_device(index)
        chosen = torch.device("cuda", index)
    else:
        chosen = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Topology(rank, world_size, local_rank, chosen)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(values: Tensor) -> Tensor:
    """Sum of `values` over all processes (a copy; `values` itself is untouched)."""
    total = values.detach().clone()
    if _active():
        dist.all_reduce(total)
    return total


class _GatherWithGrad(torch.autograd.Function):
    """Concatenate every process's rows; the backward pass hands each process the summed gradient of its rows."""

    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: list[int]) -> Tensor:
        rank, largest = dist.get_rank(), max(sizes)
        padded = tensor.new_zeros((largest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank, ctx.largest = sizes, rank, largest
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        stacked = grad.new_zeros((len(ctx.sizes), ctx.largest, *grad.shape[1:]))
        for index, piece in enumerate(torch.split(grad, ctx.sizes)):
            stacked[index, : piece.shape[0]] = piece
        dist.all_reduce(stacked)
        return stacked[ctx.rank, : ctx.sizes[ctx.rank]].contiguous(), None


def gather_with_grad(tensor: Tensor) -> tuple[Tensor, int]:
    """``(rows of every process concatenated in rank order, offset of this process's rows)``.

    Differentiable: the gradient reaching each process's rows is the sum of the gradients that
    every process's loss sends them, so the DDP-averaged gradient equals that of one process
    holding the whole batch. Row counts may differ between processes (they are exchanged first).
    """
    if not _active():
        return tensor, 0
    count = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    offset = sum(sizes[: dist.get_rank()])
    return _GatherWithGrad.apply(tensor, sizes), offset


def barrier() -> None:
    if _active():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
