"""The fused CPU ops (:mod:`llm2vec_fast.cpu_fused`) in a model's RMSNorm, SwiGLU MLP and rotary embedding.

:func:`use_fused_cpu_ops` gives each module of a known class its own ``forward`` (an instance attribute; the class
is untouched): the fused op where it computes what the class's forward does, the class's forward otherwise. Fused:
float32 CPU tensors that autograd does not track (``inference_mode``, ``no_grad``, or no input requiring grad), not
under ``torch.compile``, the ops built. Anything else (CUDA, bfloat16, training) runs the module as before.

The rotary embedding is a function the attention layers look up in their modeling module
(``apply_rotary_pos_emb``), so there the module's function is wrapped, as Liger-Kernel patches it: the fused op
under the same conditions, whose results equal the original's bit for bit, the original otherwise. Every model of
that family in the process then takes it.

The SwiGLU MLP also walks its tokens in chunks of about 4 MiB of gate and up activations: the fused activation then
reads them from the L2 cache that the two projections just wrote them to.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers import activations as hf_activations

from .. import cpu_fused
from .patching import attention_layers

RMS_NORM_CLASSES = frozenset(
    f"{family}RMSNorm" for family in ("Llama", "Mistral", "Qwen2", "Qwen3", "Phi3", "Granite", "Olmo2")
)
"""RMSNorm classes computing ``weight * (x * rsqrt(mean(x**2) + variance_epsilon))`` (Gemma's ``1 + weight`` is not)."""
SWIGLU_CLASSES = frozenset(f"{family}MLP" for family in ("Llama", "Mistral", "Qwen2", "Qwen3", "Granite", "Olmo2"))
"""MLP classes computing ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``; fused where ``act_fn`` is SiLU."""
GATE_UP_SWIGLU_CLASSES = frozenset({"Phi3MLP"})
"""MLP classes computing ``down_proj(up * activation_fn(gate))`` with ``gate, up = gate_up_proj(x).chunk(2, -1)``."""
ROTARY_MODULES = frozenset(
    f"transformers.models.{family}.modeling_{family}"
    for family in ("llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "gemma", "gemma2", "gemma3")
)
"""Modeling modules whose ``apply_rotary_pos_emb(q, k, cos, sin)`` is ``x * cos + rotate_half(x) * sin`` over the
whole head (Phi-3's rotates part of it)."""
_ORIGINAL = "_llm2vec_fast_original"  # on a wrapped rotary function: the function it wraps
_rotary_lock = threading.Lock()
CHUNK_BYTES = 4 << 20
"""Gate and up activations per MLP chunk: within a core's L2 cache next to the chunk's input and output."""
MIN_CHUNK_ROWS = 256
"""Fewest tokens per MLP chunk, so that each chunk's GEMMs stay efficient (and large weights are not re-read often)."""
_SILU_CLASSES = (nn.SiLU, *filter(None, [getattr(hf_activations, "SiLUActivation", None)]))
"""The activations that are ``F.silu``: torch's, and transformers' own (``ACT2FN["silu"]``)."""


def _fusable(x: Tensor, *weights: Tensor) -> bool:
    """Whether the fused ops compute this call: float32 CPU tensors autograd does not track, eager, ops built."""
    if type(x) is not Tensor or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if any(w.device.type != "cpu" or w.dtype != torch.float32 for w in weights):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
        return False
    return not torch.compiler.is_compiling() and cpu_fused.available()


def _chunk_rows(intermediate_size: int) -> int:
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (2 * 4 * intermediate_size))


def _rms_norm(module: nn.Module, hidden_states: Tensor) -> Tensor | None:
    if not _fusable(hidden_states, module.weight):
        return None
    return cpu_fused.rms_norm(hidden_states, module.weight, module.variance_epsilon)


def _chunked_swiglu(
    x: Tensor,
    intermediate_size: int,
    gate_and_up: Callable[[Tensor], tuple[Tensor, Tensor]],
    activation: nn.Module,
    down_proj: nn.Module,
) -> Tensor:
    """``down_proj(activation(gate) * up)`` of `x`'s tokens, walked in chunks of :func:`_chunk_rows` tokens; the down
    projection writes each chunk in place where it is a plain float32 ``nn.Linear``, else the chunks are joined."""
    rows = x.reshape(-1, x.shape[-1])
    step = _chunk_rows(intermediate_size)

    def hidden_chunks() -> Iterator[Tensor]:
        for start in range(0, rows.shape[0], step):
            gate, up = gate_and_up(rows[start : start + step])
            yield cpu_fused.silu_mul(gate, up) if _fusable(gate, up) else activation(gate) * up

    if type(down_proj) is not nn.Linear or down_proj.weight.dtype != torch.float32:
        out = torch.cat([down_proj(hidden) for hidden in hidden_chunks()])
    else:
        weight, bias = down_proj.weight.t(), down_proj.bias
        out = rows.new_empty((rows.shape[0], weight.shape[1]))
        for start, hidden in zip(range(0, rows.shape[0], step), hidden_chunks()):
            target = out[start : start + hidden.shape[0]]
            torch.mm(hidden, weight, out=target) if bias is None else torch.addmm(bias, hidden, weight, out=target)
    return out.view(*x.shape[:-1], out.shape[-1])


def _swiglu(module: nn.Module, x: Tensor) -> Tensor | None:
    if not _fusable(x):
        return None

    def gate_and_up(chunk: Tensor) -> tuple[Tensor, Tensor]:
        return module.gate_proj(chunk), module.up_proj(chunk)

    return _chunked_swiglu(x, module.gate_proj.out_features, gate_and_up, module.act_fn, module.down_proj)


def _gate_up_swiglu(module: nn.Module, hidden_states: Tensor) -> Tensor | None:
    if not _fusable(hidden_states):
        return None

    def gate_and_up(chunk: Tensor) -> tuple[Tensor, Tensor]:
        return module.gate_up_proj(chunk).chunk(2, dim=-1)

    intermediate_size = module.gate_up_proj.out_features // 2
    return _chunked_swiglu(hidden_states, intermediate_size, gate_and_up, module.activation_fn, module.down_proj)


def _rotary_fusable(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    if not (q.dim() == k.dim() == 4 and cos.dim() == sin.dim() == 3 and q.stride(-1) == k.stride(-1) == 1):
        return False
    batch, _, seq, dim = q.shape
    angles = cos.shape
    if k.shape[0] != batch or k.shape[2:] != (seq, dim) or sin.shape != angles or angles[1:] != (seq, dim):
        return False
    return angles[0] in (1, batch) and dim % 2 == 0 and _fusable(q, k, cos, sin)


def _wrap_rotary(original: Any) -> Any:
    @functools.wraps(original)
    def apply_rotary_pos_emb(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and _rotary_fusable(q, k, cos, sin):
            return cpu_fused.rotary(q, cos, sin), cpu_fused.rotary(k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    setattr(apply_rotary_pos_emb, _ORIGINAL, original)
    return apply_rotary_pos_emb


def _route_rotary(model: nn.Module) -> None:
    """Wrap ``apply_rotary_pos_emb`` in the modeling modules of `model`'s attention layers (once per module)."""
    for name in {type(layer).__module__ for layer in attention_layers(model)} & ROTARY_MODULES:
        module = sys.modules[name]
        with _rotary_lock:
            function = getattr(module, "apply_rotary_pos_emb", None)
            if callable(function) and not hasattr(function, _ORIGINAL):
                module.apply_rotary_pos_emb = _wrap_rotary(function)


class FusedForward:
    """A module's forward: `fused` (one of this module's functions) where it returns a tensor, else the class's.

    A plain object holding the module, so that a model keeps pickling, deep-copying and saving as before.
    """

    def __init__(self, module: nn.Module, fused: Any):
        self.module, self.fused = module, fused

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.fused(self.module, *args, **kwargs) if not kwargs and len(args) == 1 else None
        return out if out is not None else type(self.module).forward(self.module, *args, **kwargs)


def _fused_form(module: nn.Module) -> Any:
    """The fused function for `module`, or None where its class is not one we know to compute the same."""
    name = type(module).__name__
    if name in RMS_NORM_CLASSES and hasattr(module, "variance_epsilon"):
        return _rms_norm
    if name in SWIGLU_CLASSES and isinstance(getattr(module, "act_fn", None), _SILU_CLASSES):
        return _swiglu
    if name in GATE_UP_SWIGLU_CLASSES and isinstance(getattr(module, "activation_fn", None), _SILU_CLASSES):
        return _gate_up_swiglu
    return None


def use_fused_cpu_ops(model: nn.Module) -> int:
    """Route `model`'s RMSNorm, SwiGLU MLP and rotary embedding through the fused CPU ops where they apply (see the
    module docstring); idempotent. Returns how many modules are routed. The ops are built on the first fused call."""
    _route_rotary(model)
    routed = 0
    for module in model.modules():
        fused = _fused_form(module)
        if fused is None:
            continue
        if not isinstance(module.__dict__.get("forward"), FusedForward):
            module.forward = FusedForward(module, fused)
        routed += 1
    return routed
