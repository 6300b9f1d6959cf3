"""Tiny random decoder LLMs and a locally trained tokenizer: real architectures, toy widths, no downloads.

Used by the tests, the demo command and functional benchmarks. Weights are random (seeded), the
tokenizer is a byte-level BPE trained in milliseconds on a built-in corpus, so every text encodes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "granite", "olmo2")

PRESETS = {
    "llama3.2": (
        "llama",
        dict(  # Llama 3.1/3.2: llama3 rope scaling; 3.2 1B/3B tie their embeddings
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=32.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8,
            ),
            tie_word_embeddings=True,
        ),
    ),
    "qwen2.5": ("qwen2", dict(tie_word_embeddings=True)),  # Qwen2.5 0.5B-3B
    "qwen3-tied": ("qwen3", dict(tie_word_embeddings=True)),  # Qwen3 0.6B-4B
    "embeddinggemma": ("gemma3", dict(use_bidirectional_attention=True, sliding_window=6)),  # window |i - j| < 4
}
"""Named configurations of a family that real checkpoints use: ``build_tiny_model(name)`` accepts them too."""

MODELS = FAMILIES + tuple(PRESETS)

CORPUS = (
    "A man is playing a guitar on the street.",
    "A woman is slicing an onion in the kitchen.",
    "The quick brown fox jumps over the lazy dog.",
    "Decoder-only language models can become strong text encoders.",
    "Bidirectional attention lets every token see the whole sentence.",
    "Retrieve documents that answer the question.",
    "What is the capital of France? Paris is the capital of France.",
    "Masked next token prediction adapts the model to bidirectional attention.",
    "Contrastive learning pulls paired sentences together and pushes others apart.",
    "Flash attention computes exact attention without materialising the score matrix.",
    "Padding tokens carry no information and should cost nothing.",
    "Given a claim, find documents that refute it: the earth is flat.",
    "numbers 0123456789 and symbols _-+=*/\\|<>[]{}()!?.,;:'\"@#$%^&~`",
)

FAMILY_SETTINGS = {
    "gemma2": dict(query_pre_attn_scalar=16, sliding_window=4),
    "gemma3": dict(query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention"], sliding_window=4),
    "granite": dict(attention_multiplier=0.3, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0),
}
"""Per-family settings that make the toy model exercise what the family changes (window, scales)."""

SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A Llama-style tokenizer (prepends ``<s>``; ``</s>`` and ``<unk>`` special; no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    bos_id = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def tiny_config(family: str, vocab_size: int, **overrides) -> PretrainedConfig:
    """A config of `family` (or a preset) at toy width: hidden 64, 2 layers, 4 query heads, 2 KV heads, head_dim 16."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GemmaConfig,
        GraniteConfig,
        LlamaConfig,
        MistralConfig,
        Olmo2Config,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    classes = {
        "llama": LlamaConfig,
        "mistral": MistralConfig,
        "qwen2": Qwen2Config,
        "qwen3": Qwen3Config,
        "gemma": GemmaConfig,
        "gemma2": Gemma2Config,
        "gemma3": Gemma3TextConfig,
        "phi3": Phi3Config,
        "granite": GraniteConfig,
        "olmo2": Olmo2Config,
    }
    if family in PRESETS:
        family, preset = PRESETS[family]
        overrides = {**preset, **overrides}
    if family not in classes:
        raise ValueError(f"unknown tiny model family {family!r}: choose one of {', '.join(MODELS)}")
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    settings.update(FAMILY_SETTINGS.get(family, {}))
    settings.update(overrides)
    return classes[family](**settings)


def build_tiny_model(
    family: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A randomly initialised ``<Family>ForCausalLM`` (seeded, global RNG untouched) and its tokenizer."""
    tokenizer = build_tokenizer()
    config = tiny_config(family, len(tokenizer), **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=dtype)
    return model.eval(), tokenizer


def save_tiny_model(directory: str | Path, family: str = "llama", *, seed: int = 0, **config_overrides) -> Path:
    """Write a tiny model and its tokenizer to `directory`, loadable with ``from_pretrained``."""
    directory = Path(directory)
    model, tokenizer = build_tiny_model(family, seed=seed, **config_overrides)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
