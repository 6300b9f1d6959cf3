"""llm2vec-fast: fused bidirectional flash attention for turning decoder LLMs into text encoders."""

from .backends import BACKEND_ENV_VAR, available_backends, resolve_backend
from .functional import flash_attn_func, flash_attn_varlen_func
from .padding import pad_input, unpad_input

__version__ = "0.1.0"


def __getattr__(name: str):
    """``LLM2Vec`` is imported on first use: it pulls in transformers, which the attention ops do not need."""
    if name == "LLM2Vec":
        from .encoder import LLM2Vec

        return LLM2Vec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKEND_ENV_VAR",
    "LLM2Vec",
    "available_backends",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "pad_input",
    "resolve_backend",
    "unpad_input",
]
