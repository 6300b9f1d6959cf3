"""Hugging Face integration: bidirectional Llama/Mistral/Qwen2/Qwen3/Gemma/Gemma2 on llm2vec_fast attention.

from llm2vec_fast.hf import enable_bidirectional, pack_batch
model = enable_bidirectional(AutoModel.from_pretrained(path))
packed = pack_batch(batch["input_ids"], batch["attention_mask"])   # unpad once
hidden = model(**packed.model_inputs()).last_hidden_state           # (1, T, H): real tokens only
"""

from .attention import ATTENTION_NAME, llm2vec_fast_attention, llm2vec_fast_mask, register
from .dropout import dropout_disabled, without_dropout
from .fused_cpu import use_fused_cpu_ops
from .packing import PackedBatch, pack_batch, pack_sequences
from .patching import (
    SUPPORTED_MODEL_TYPES,
    check_supported_model,
    disable_bidirectional,
    enable_bidirectional,
    is_bidirectional,
    load_bidirectional,
    route_attention,
    transformers_model,
)

__all__ = [
    "ATTENTION_NAME",
    "PackedBatch",
    "SUPPORTED_MODEL_TYPES",
    "check_supported_model",
    "disable_bidirectional",
    "dropout_disabled",
    "enable_bidirectional",
    "is_bidirectional",
    "llm2vec_fast_attention",
    "llm2vec_fast_mask",
    "load_bidirectional",
    "pack_batch",
    "pack_sequences",
    "register",
    "route_attention",
    "transformers_model",
    "use_fused_cpu_ops",
    "without_dropout",
]
