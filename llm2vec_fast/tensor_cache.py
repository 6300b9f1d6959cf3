"""Results derived from a tensor, computed once and reused while the tensor is unchanged.

A model calls attention once per layer with the same mask or offsets tensor: what is derived from
it (a validity check, the kernels' key spans) belongs once per forward, not once per layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor


def _state(tensor: Tensor) -> Hashable:
    """What tells this tensor's contents apart from before: its in-place version counter, and the
    memory it views (``tensor.data = other`` swaps that without bumping the version)."""
    return tensor._version, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device


class TensorCache:
    """Values keyed by a tensor's identity, version and memory (plus an extra key); at most `size` entries.

    Inference tensors keep no version counter, so an in-place edit of one cannot be seen: they are
    never cached (the value is computed on every call). Writes that bypass torch (through a numpy
    or DLPack alias) do not bump the version either and are not seen.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._entries: dict[int, tuple[weakref.ref, Hashable, Any]] = {}

    def get(self, tensor: Tensor, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The cached value for (tensor, key), else ``compute()`` (cached unless it raises)."""
        if tensor.is_inference():
            return compute()
        state = (_state(tensor), key)
        entry = self._entries.get(id(tensor))
        if entry is not None and entry[0]() is tensor and entry[1] == state:
            return entry[2]
        value = compute()
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[id(tensor)] = (weakref.ref(tensor), state, value)
        return value


def cacheable(tensor: Tensor) -> Tensor:
    """`tensor`, copied into a normal tensor if it is an inference tensor, so that `TensorCache` can cache
    what is derived from it.

    Inference tensors (``torch.inference_mode()``, where encoders run) have no version counter and are
    never cached: a mask or offsets tensor made once per forward would have its state (key spans, the
    offsets check, a host sync on a GPU) derived again in every layer. A copy of these few bytes keeps it
    once per forward.
    """
    if not tensor.is_inference():
        return tensor
    with torch.inference_mode(False):
        return tensor.clone()
