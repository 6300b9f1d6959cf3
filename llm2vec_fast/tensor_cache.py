"""Results derived from a tensor, computed once and reused while the tensor is unchanged.

A model calls attention once per layer with the same mask or offsets tensor: what is derived from
it (a validity check, the kernels' key spans) belongs once per forward, not once per layer.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any

from torch import Tensor


class TensorCache:
    """Values keyed by a tensor's identity and in-place version (plus an extra key); at most `size` entries.

    Inference tensors keep no version counter: they are matched by identity alone.
    """

    def __init__(self, size: int = 64) -> None:
        self._size = size
        self._entries: dict[int, tuple[weakref.ref, Hashable, Any]] = {}

    def get(self, tensor: Tensor, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The cached value for (tensor, key), else ``compute()`` (cached unless it raises)."""
        version = None if tensor.is_inference() else tensor._version
        entry = self._entries.get(id(tensor))
        if entry is not None and entry[0]() is tensor and entry[1] == (version, key):
            return entry[2]
        value = compute()
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[id(tensor)] = (weakref.ref(tensor), (version, key), value)
        return value
