"""The networks being trained: a bidirectional decoder with LoRA, plus what each objective puts on top.

- `MaskedNextTokenModel` (MNTP): decoder -> hidden state at each position preceding a masked
  token -> LM head -> cross-entropy; the LM head only ever sees the masked positions.
- `SentenceEmbedder` (SimCSE, supervised): decoder -> pooled sequence embeddings.

On ``attn_implementation="llm2vec_fast"`` batches run packed (no padded token is computed); with
``"sdpa"`` or ``"eager"`` they run padded through Hugging Face's own bidirectional attention, the
reference that parity tests and benchmarks compare against.

LoRA wraps the base decoder (not the ``*ForCausalLM``), so adapters load with
``LLM2Vec.from_pretrained(base, peft_model_name_or_path=...)`` exactly like the official ones.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..hf import check_supported_model, load_bidirectional, pack_sequences, transformers_model
from ..hf.patching import attention_layers
from ..pooling import pool_packed, pool_padded
from .config import TrainConfig
from .data.batches import ContrastiveBatch, MNTPBatch, pad_right
from .losses import masked_token_loss_sum

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``torch_dtype`` of the config; "auto" is bfloat16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


@dataclass(frozen=True)
class DecoderSpec:
    """The base decoder to train and how, resolved once from a config (`decoder_spec`) for every builder below."""

    path: str
    device: torch.device
    dtype: torch.dtype
    attention: str  # "llm2vec_fast": packed batches on our kernels; "sdpa"/"eager": padded, Hugging Face's attention
    backend: str | None  # the llm2vec_fast backend forced, or None (chosen per call)
    merged_adapter: str | None  # a previous adapter (the MNTP one) merged into the weights before the new LoRA
    lora: LoraConfig
    gradient_checkpointing: bool

    @property
    def packed(self) -> bool:
        return self.attention == "llm2vec_fast"


def lora_config(config: TrainConfig) -> LoraConfig:
    """The LoRA adapter a run trains (everything else frozen)."""
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        bias="none",
        task_type=None,
    )


def decoder_spec(config: TrainConfig, device: torch.device) -> DecoderSpec:
    """The `DecoderSpec` of `config` on `device` (``torch_dtype="auto"`` and ``attention_backend="auto"`` resolved)."""
    return DecoderSpec(
        path=config.model_name_or_path,
        device=device,
        dtype=resolve_dtype(config.torch_dtype, device),
        attention=config.attn_implementation,
        backend=None if config.attention_backend == "auto" else config.attention_backend,
        merged_adapter=config.peft_model_name_or_path,
        lora=lora_config(config),
        gradient_checkpointing=config.gradient_checkpointing,
    )


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def use_hf_attention(model: Any, implementation: str) -> Any:
    """Switch `model` to Hugging Face's own attention (``"sdpa"``/``"eager"``), bidirectional: the parity and
    benchmark baseline."""
    inner = transformers_model(model)
    inner.set_attn_implementation(implementation)
    inner.config.is_causal = False
    for layer in attention_layers(inner):
        layer.is_causal = False
    return model


def load_decoder(spec: DecoderSpec, model_class: Any) -> Any:
    """`model_class` (``AutoModel`` or ``AutoModelForCausalLM``) loaded bidirectional, on the spec's device."""
    from transformers import AutoConfig

    check_supported_model(AutoConfig.from_pretrained(spec.path))
    options: dict[str, Any] = {"dtype": spec.dtype}
    if spec.device.type == "cuda":
        options["device_map"] = {"": str(spec.device)}  # straight to this process's GPU, not through host memory
    if spec.packed:
        model = load_bidirectional(spec.path, model_class=model_class, backend=spec.backend, **options)
    else:
        model = model_class.from_pretrained(spec.path, **options)
        use_hf_attention(model, spec.attention)
    for layer in attention_layers(transformers_model(model)):
        layer.attention_dropout = 0.0
    transformers_model(model).config.use_cache = False
    return model.to(spec.device)


def merge_adapter(model: Any, adapter: str) -> Any:
    """Merge a LoRA adapter (e.g. the MNTP one) into the weights, returning the plain transformers model.

    The merged model is named after the adapter, so a new LoRA trained on top records the adapter
    directory as its ``base_model_name_or_path``: loading the new adapter alone then rebuilds
    base + merged adapter + new adapter, the model that was trained.
    """
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.name_or_path = merged.config._name_or_path = adapter  # peft reads the attribute, transformers the config
    return merged


# Projections some families fuse (Phi-3: qkv_proj, gate_up_proj): a target naming one part of a fused
# projection trains the fused module where the model has no separate one.
FUSED_PROJECTIONS = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}


def lora_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """`targets` as module names of `model`: parts of a fused projection mapped to it, a ValueError for the rest."""
    names = [name for name, _ in model.named_modules()]

    def present(target: str) -> bool:
        return any(name.endswith(f".{target}") for name in names)

    resolved: list[str] = []
    for target in sorted(targets):
        fused = FUSED_PROJECTIONS.get(target)
        if not present(target) and fused is not None and present(fused):
            target = fused
        if target not in resolved:
            resolved.append(target)
    missing = [target for target in resolved if not present(target)]
    if missing:
        raise ValueError(f"lora_target_modules {missing} match no module of {type(model).__name__}")
    return resolved


def add_lora(model: Any, lora: LoraConfig, gradient_checkpointing: bool) -> PeftModel:
    """Wrap `model` with a fresh `lora` adapter (everything else frozen), with activation checkpointing or not."""
    lora = copy.copy(lora)
    lora.target_modules = set(lora_targets(model, lora.target_modules))
    peft_model = get_peft_model(model, lora)
    if gradient_checkpointing:
        _enable_checkpointing(transformers_model(peft_model))
    return peft_model


def _enable_checkpointing(model: Any) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers renamed the method in 5.2x)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class MaskedNextTokenModel(nn.Module):
    """MNTP: the loss *sum* over a batch's masked tokens, each predicted from the position before it."""

    def __init__(
        self,
        decoder: nn.Module,
        lm_head: nn.Linear,
        *,
        packed: bool,
        pad_id: int,
        chunk_size: int,
        softcap: float | None = None,
    ):
        super().__init__()
        self.decoder, self.lm_head = decoder, lm_head
        self.packed, self.pad_id, self.chunk_size, self.softcap = packed, pad_id, chunk_size, softcap

    def forward(self, batch: MNTPBatch) -> Tensor:
        device = self.lm_head.weight.device
        if self.packed:
            packed = pack_sequences(batch.sequences, device)
            hidden = self.decoder(**packed.model_inputs()).last_hidden_state[0]
            sources = batch.packed_sources()
        else:
            input_ids, attention_mask = pad_right(batch.sequences, self.pad_id, device)
            hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.flatten(0, 1)
            sources = batch.padded_sources(input_ids.shape[1])
        predicting = hidden.index_select(0, torch.from_numpy(sources).to(device))
        targets = torch.from_numpy(batch.target_ids).to(device)
        return masked_token_loss_sum(predicting, self.lm_head.weight, targets, self.chunk_size, self.softcap)


class SentenceEmbedder(nn.Module):
    """Sequence embeddings ``(N, H)`` (float32) of a contrastive batch, pooled as the encoder pools them."""

    def __init__(self, decoder: nn.Module, *, packed: bool, pad_id: int, pooling_mode: str, skip_instruction: bool):
        super().__init__()
        self.decoder = decoder
        self.packed, self.pad_id, self.pooling_mode, self.skip_instruction = (
            packed,
            pad_id,
            pooling_mode,
            skip_instruction,
        )

    def forward(self, batch: ContrastiveBatch) -> Tensor:
        device = next(self.decoder.parameters()).device
        instruction_lengths = torch.tensor(batch.instruction_lengths, device=device) if self.skip_instruction else None
        if self.packed:
            packed = pack_sequences(batch.sequences, device)
            hidden = self.decoder(**packed.model_inputs()).last_hidden_state[0]
            return pool_packed(hidden, packed.cu_seqlens, self.pooling_mode, instruction_lengths)
        input_ids, attention_mask = pad_right(batch.sequences, self.pad_id, device)
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_padded(hidden, attention_mask, self.pooling_mode, instruction_lengths)


def add_attention_output_dropout(model: nn.Module, probability: float) -> list[Any]:
    """Dropout on each attention block's output (the input of ``o_proj``), active in training mode only.

    SimCSE's positive pairs differ only by dropout; LLM2Vec puts it on the attention probabilities
    (``attention_dropout=0.3``), which our fused kernels do not implement, so on them the noise goes
    on the attention output instead. Returns the hook handles.
    """

    def drop(module: nn.Module, args: tuple) -> tuple:
        return (F.dropout(args[0], probability, module.training), *args[1:])

    return [layer.o_proj.register_forward_pre_hook(drop) for layer in attention_layers(transformers_model(model))]


def build_mntp_model(
    spec: DecoderSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    vocabulary_grew: bool,
    train_lm_head: bool,
    chunk_size: int,
) -> MaskedNextTokenModel:
    """Bidirectional ``*ForCausalLM`` split into a LoRA-wrapped decoder and its LM head (frozen unless `train_lm_head`).

    `chunk_size`: masked positions per LM-head chunk (``loss_chunk_size``).
    """
    causal_lm = load_decoder(spec, AutoModelForCausalLM)
    if vocabulary_grew:
        causal_lm.resize_token_embeddings(len(tokenizer))
    lm_head = causal_lm.get_output_embeddings()
    decoder = causal_lm.get_decoder()
    tied = lm_head.weight is decoder.get_input_embeddings().weight
    if train_lm_head and tied:
        raise ValueError(
            "lm_head='train' is not possible: this model ties its LM head to the input embeddings; use 'freeze'"
        )
    lm_head.weight.requires_grad_(train_lm_head)
    if spec.merged_adapter:
        decoder = merge_adapter(decoder, spec.merged_adapter)
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    return MaskedNextTokenModel(
        add_lora(decoder, spec.lora, spec.gradient_checkpointing),
        lm_head,
        packed=spec.packed,
        pad_id=pad_token_id(tokenizer),
        chunk_size=chunk_size,
        softcap=softcap,
    )


def build_embedder(
    spec: DecoderSpec,
    tokenizer: PreTrainedTokenizerBase,
    *,
    pooling_mode: str,
    skip_instruction: bool,
    dropout: float = 0.0,
) -> SentenceEmbedder:
    """Bidirectional base model, previous adapter (MNTP) merged, a new LoRA on top; `dropout` as SimCSE's."""
    model = load_decoder(spec, AutoModel)
    if spec.merged_adapter:
        model = merge_adapter(model, spec.merged_adapter)
    if dropout and not spec.packed:
        for layer in attention_layers(transformers_model(model)):
            layer.attention_dropout = dropout
    model = add_lora(model, spec.lora, spec.gradient_checkpointing)
    if dropout and spec.packed:
        add_attention_output_dropout(model, dropout)
    return SentenceEmbedder(
        model,
        packed=spec.packed,
        pad_id=pad_token_id(tokenizer),
        pooling_mode=pooling_mode,
        skip_instruction=skip_instruction,
    )
