"""llm2vec-fast: fused bidirectional flash attention for turning decoder LLMs into text encoders."""
from .backends import BACKEND_ENV_VAR, available_backends, resolve_backend
from .functional import flash_attn_func, flash_attn_varlen_func
from .padding import pad_input, unpad_input

__version__ = "0.1.0"

__all__ = [
    "BACKEND_ENV_VAR",
    "available_backends",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "pad_input",
    "resolve_backend",
    "unpad_input",
]
