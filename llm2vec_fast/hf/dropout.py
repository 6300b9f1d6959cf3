"""Run a model without dropout in one thread, leaving ``module.training`` alone.

Toggling ``eval()``/``train()`` is shared state: another thread (or the caller) would see it change
mid-forward. Instead every dropout module of the model gets two forward hooks, no-ops except in a
thread inside :func:`without_dropout`, where they hand the module's input through unchanged; the
attention function reads :func:`dropout_disabled` to ignore the attention dropout HF passes in
train mode.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

_state = threading.local()  # per thread: .active (nesting depth) and .inputs (by module id)
_HOOKED = "_llm2vec_fast_dropout_hooks"  # set on a dropout module once it has the hooks (survives pickling)
_hook_lock = threading.Lock()


def _keep_dropout_input(module: nn.Module, args: tuple) -> tuple | None:
    if not dropout_disabled():
        return None
    _state.inputs[id(module)] = args[0]
    return (args[0].clone(), *args[1:]) if getattr(module, "inplace", False) else None


def _return_dropout_input(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
    if not dropout_disabled():
        return None
    return _state.inputs.pop(id(module), output)


def _hook_dropout(model: nn.Module) -> None:
    with _hook_lock:
        for module in model.modules():
            if isinstance(module, nn.modules.dropout._DropoutNd) and not getattr(module, _HOOKED, False):
                module.register_forward_pre_hook(_keep_dropout_input)
                module.register_forward_hook(_return_dropout_input)
                setattr(module, _HOOKED, True)


@contextmanager
def without_dropout(model: nn.Module) -> Iterator[None]:
    """Within this block, this thread runs `model` with every dropout module passing its input through."""
    _hook_dropout(model)  # modules added since the last call (e.g. a new adapter) get their hooks too
    if not dropout_disabled():
        _state.inputs = {}
    _state.active = getattr(_state, "active", 0) + 1
    try:
        yield
    finally:
        _state.active -= 1


def dropout_disabled() -> bool:
    """Whether this thread is inside :func:`without_dropout`."""
    return bool(getattr(_state, "active", 0))
