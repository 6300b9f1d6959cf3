"""Our attention ops as a transformers attention implementation, registered under one name.

transformers (>= 5.17) looks attention up by ``config._attn_implementation`` in two registries:
``AttentionInterface`` (the function each attention layer calls) and ``AttentionMaskInterface`` (what
the model builds once per forward from the 2-D padding mask). Both are registered here. The mask
function hands the 2-D key-padding mask through untouched (our kernels read it directly, no 4-D
bias is ever built); the attention function picks, per call:

- packed sequences (``cu_seq_lens_q/k`` in the kwargs, batch of one row) -> ``flash_attn_varlen_func``;
- a padded batch -> ``flash_attn_func`` with the key-padding mask;
- causal or bidirectional from the ``is_causal`` kwarg (set from ``config.is_causal``), else the layer's flag.

Sliding windows are honoured when causal; bidirectional, Gemma 2/3 sliding layers keep transformers'
symmetric window (``_window``) while the other families see the whole sequence, as LLM2Vec does.
Gemma 2's logit softcapping goes to the ops' ``softcap``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..functional import flash_attn_func, flash_attn_varlen_func
from ..tensor_cache import cacheable
from .dropout import dropout_disabled

ATTENTION_NAME = "llm2vec_fast"
BACKEND_ATTRIBUTE = "_llm2vec_fast_backend"
"""Attribute set on attention layers by ``enable_bidirectional(..., backend=...)``: the backend to force."""


def _is_causal(module: nn.Module, is_causal: bool | None) -> bool:
    if is_causal is not None:
        return bool(is_causal)
    config_value = getattr(getattr(module, "config", None), "is_causal", None)
    if config_value is not None:
        return bool(config_value)
    return bool(getattr(module, "is_causal", True))


BIDIRECTIONAL_WINDOW_MODEL_TYPES = ("gemma2", "gemma3_text")
"""Families whose sliding-window layers stay windowed when bidirectional (others widen to global, as LLM2Vec)."""


def _window(module: nn.Module, causal: bool, sliding_window: int | None) -> tuple[int, int]:
    """transformers' sliding window of `w` as flash-attn's ``(left, right)``, matching its eager masks.

    Causal: ``kv > q - w`` is ``(w - 1, 0)``. A natively bidirectional model (``use_bidirectional_attention``,
    EmbeddingGemma) sees ``|q - kv| < w``: ``(w - 1, w - 1)``. Made bidirectional by ``config.is_causal = False``,
    transformers' ``create_bidirectional_sliding_window_mask`` sees ``|q - kv| <= w``: ``(w, w)``.
    """
    if sliding_window is None:
        return (-1, -1)
    width = int(sliding_window)
    if causal:
        return (width - 1, 0)
    config = getattr(module, "config", None)
    if getattr(config, "use_bidirectional_attention", False):
        return (width - 1, width - 1)
    if getattr(config, "model_type", None) in BIDIRECTIONAL_WINDOW_MODEL_TYPES:
        return (width, width)
    return (-1, -1)


def llm2vec_fast_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function: q ``(B, Hq, S, D)``, k/v ``(B, Hkv, S, D)`` -> ``((B, S, Hq, D), None)``."""
    if dropout and not dropout_disabled():  # inside without_dropout (encoding) HF's train-mode dropout is ignored
        raise ValueError(
            f"attention dropout ({dropout}) is not supported by the {ATTENTION_NAME} attention; "
            "set config.attention_dropout = 0.0"
        )
    if kwargs.get("output_attentions"):
        raise ValueError(
            f"output_attentions=True is not supported by the {ATTENTION_NAME} attention (no weights are materialised)"
        )
    causal = _is_causal(module, is_causal)
    options = dict(
        causal=causal,
        softmax_scale=scaling,
        window_size=_window(module, causal, sliding_window),
        softcap=float(softcap or 0.0),
        backend=getattr(module, BACKEND_ATTRIBUTE, None),
    )
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, S, H, D) views, no copy
    cu_seqlens_q = kwargs.get("cu_seq_lens_q")
    if cu_seqlens_q is not None:
        if q.shape[0] != 1:
            raise ValueError(
                f"packed sequences (cu_seq_lens_q) must come as one row of tokens, got a batch of {q.shape[0]}"
            )
        cu_seqlens_k = kwargs.get("cu_seq_lens_k", cu_seqlens_q)
        out = flash_attn_varlen_func(
            q[0],
            k[0],
            v[0],
            cu_seqlens_q.to(torch.int32),
            cu_seqlens_k.to(torch.int32),
            int(kwargs.get("max_length_q") or q.shape[1]),
            int(kwargs.get("max_length_k") or k.shape[1]),
            **options,
        )
        return out.unsqueeze(0), None
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"the {ATTENTION_NAME} attention takes a 2-D key-padding mask, got shape {tuple(attention_mask.shape)}; "
            "pass the tokenizer's (batch, seqlen) attention_mask, not a prepared 4-D mask"
        )
    return flash_attn_func(q, k, v, attention_mask, **options), None


def llm2vec_fast_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    **kwargs,
) -> Tensor | None:
    """transformers mask function: the 2-D bool key-padding mask over the ``kv_length`` keys, None if nothing is padded.

    The causal, bidirectional and sliding-window patterns that `mask_function` describes are applied by
    the kernels from their ``causal``/``window_size`` arguments instead.
    """
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:]
    if mask.dtype != torch.bool:
        mask = mask.bool()
    # The all-real shortcut reads the mask back: one host sync per forward of a padded batch (never per layer, and
    # never on packed sequences, which come without a mask), bought back by running the unmasked kernels.
    if mask.shape[-1] == kv_length and not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    # Made once per forward: a normal tensor lets what the kernels derive from it be cached for every layer
    # (traced graphs have no such cache, and dynamo cannot trace is_inference()).
    return mask if torch.compiler.is_compiling() else cacheable(mask)


def register() -> None:
    """Register the attention and its mask function with transformers under ``ATTENTION_NAME`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, llm2vec_fast_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, llm2vec_fast_mask)
