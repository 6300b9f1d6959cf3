"""Turning a loaded Hugging Face decoder bidirectional (or back to causal) on our attention ops.

Nothing is monkey-patched: the model's ``config._attn_implementation`` points at our registered
attention, ``config.is_causal`` says which direction (transformers then builds bidirectional masks
and passes ``is_causal`` to every attention call), and each attention layer's ``is_causal`` flag is
kept in agreement so that layers called on their own behave the same.
"""

from __future__ import annotations

from typing import Any, TypeVar

from torch import nn

from ..backends import check_backend_name
from .attention import ATTENTION_NAME, BACKEND_ATTRIBUTE, register

SUPPORTED_MODEL_TYPES = (
    "llama",  # Llama 2, 3, 3.1, 3.2 (rope scaling is the model's own)
    "mistral",
    "qwen2",  # Qwen2, Qwen2.5
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",  # Gemma 3 text models (Gemma3ForCausalLM, Gemma3TextModel), EmbeddingGemma
    "phi3",
    "granite",
    "olmo2",
)
"""Model types whose attention layers call transformers' attention interface, so our attention serves them."""

ModelT = TypeVar("ModelT", bound=nn.Module)


def transformers_model(model: nn.Module) -> Any:
    """The transformers ``PreTrainedModel`` inside `model` (itself, or the one a peft ``PeftModel`` wraps)."""
    from transformers import PreTrainedModel

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(inner, PreTrainedModel):
        raise TypeError(
            f"expected a transformers PreTrainedModel (or a peft PeftModel wrapping one), got {type(model).__name__}"
        )
    return inner


def check_supported_model(config: Any) -> str:
    """The config's model type, or a ValueError naming the supported families."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported by llm2vec_fast; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a supported model (those holding ``o_proj`` and an ``is_causal`` flag)."""
    return [m for m in model.modules() if hasattr(m, "o_proj") and hasattr(m, "is_causal")]


def route_attention(model: ModelT, *, causal: bool, backend: str | None = None) -> ModelT:
    """Point `model`'s attention at our ops, causal or bidirectional; `backend` forces a kernel backend."""
    if backend is not None:
        check_backend_name(backend)
    inner = transformers_model(model)
    check_supported_model(inner.config)
    register()
    if inner.config._attn_implementation != ATTENTION_NAME:
        inner.set_attn_implementation(ATTENTION_NAME)
    inner.config.is_causal = causal
    for layer in attention_layers(inner):
        layer.is_causal = causal
        if backend is not None:
            setattr(layer, BACKEND_ATTRIBUTE, backend)
    return model


def enable_bidirectional(model: ModelT, *, backend: str | None = None) -> ModelT:
    """Make a model of a supported family (base, ``*ForCausalLM`` or peft-wrapped) bidirectional.

    Attention then runs through ``llm2vec_fast.flash_attn_func``/``flash_attn_varlen_func``. Gemma 2/3
    sliding-window layers keep transformers' bidirectional window; other families' windows are ignored
    (every token sees the whole sequence, as in LLM2Vec). `backend` forces one
    attention backend (``"triton"``, ``"cuda"``, ``"reference"``, ``"auto"``); None keeps the one set
    before, else the usual choice (``LLM2VEC_FAST_BACKEND``, then "auto"). Changed in place and returned.
    """
    return route_attention(model, causal=False, backend=backend)


def disable_bidirectional(model: ModelT, *, backend: str | None = None) -> ModelT:
    """Back to causal attention, still on our kernels (sliding windows honoured), e.g. for GritLM-style generation."""
    return route_attention(model, causal=True, backend=backend)


def is_bidirectional(model: nn.Module) -> bool:
    """Whether `model` runs bidirectional attention through llm2vec_fast: made so, or natively (EmbeddingGemma)."""
    config = transformers_model(model).config
    causal = getattr(config, "is_causal", None)
    natively = causal is None and bool(getattr(config, "use_bidirectional_attention", False))
    return config._attn_implementation == ATTENTION_NAME and (causal is False or natively)


def load_bidirectional(
    path: str,
    *,
    model_class: Any = None,
    backend: str | None = None,
    **hf_kwargs: Any,
) -> Any:
    """``model_class.from_pretrained(path, **hf_kwargs)`` (default ``AutoModel``), bidirectional on our kernels."""
    from transformers import AutoModel

    if hf_kwargs.get("attn_implementation", ATTENTION_NAME) != ATTENTION_NAME:
        raise ValueError(
            f"load_bidirectional always uses attn_implementation={ATTENTION_NAME!r}; "
            f"got {hf_kwargs['attn_implementation']!r} (use backend= to choose the kernel)"
        )
    register()
    hf_kwargs["attn_implementation"] = ATTENTION_NAME
    model = (model_class or AutoModel).from_pretrained(path, **hf_kwargs)
    return enable_bidirectional(model, backend=backend)
