"""llm2vec-fast: fused bidirectional flash attention for turning decoder LLMs into text encoders."""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "BACKEND_ENV_VAR": "backends",
    "available_backends": "backends",
    "resolve_backend": "backends",
    "flash_attn_func": "functional",
    "flash_attn_varlen_func": "functional",
    "pad_input": "padding",
    "unpad_input": "padding",
    "LLM2Vec": "encoder",
}


def __getattr__(name: str):
    """Every export is imported on first use, so ``import llm2vec_fast`` (and ``llm2vec-fast --help``) pays for no
    torch or transformers import; ``LLM2Vec`` pulls in transformers, which the attention ops do not need."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


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
