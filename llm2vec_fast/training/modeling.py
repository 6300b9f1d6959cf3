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

from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from ..hf import check_supported_model, load_bidirectional, pack_sequences, transformers_model
from ..hf.patching import attention_layers
from ..pooling import pool_packed, pool_padded
from .config import ContrastiveConfig, MNTPConfig, TrainConfig
from .data.batches import ContrastiveBatch, MNTPBatch, pad_right
from .losses import masked_token_loss_sum

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``torch_dtype`` of the config; "auto" is bfloat16 on CUDA and float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def use_hf_attention(model: Any, implementation: str) -> Any:
    """Switch `model` to Hugging Face's own attention (``"sdpa"``/``"eager"``), bidirectional: the parity/benchmark baseline."""
    inner = transformers_model(model)
    inner.set_attn_implementation(implementation)
    inner.config.is_causal = False
    for layer in attention_layers(inner):
        layer.is_causal = False
    return model


def load_decoder(config: TrainConfig, model_class: Any, device: torch.device) -> Any:
    """`model_class` (``AutoModel`` or ``AutoModelForCausalLM``) loaded bidirectional, on `device`."""
    from transformers import AutoConfig

    check_supported_model(AutoConfig.from_pretrained(config.model_name_or_path))
    options = {"dtype": resolve_dtype(config.torch_dtype, device)}
    if device.type == "cuda":
        options["device_map"] = {"": str(device)}  # straight to this process's GPU, not through host memory
    if config.attn_implementation == "llm2vec_fast":
        backend = None if config.attention_backend == "auto" else config.attention_backend
        model = load_bidirectional(config.model_name_or_path, model_class=model_class, backend=backend, **options)
    else:
        model = model_class.from_pretrained(config.model_name_or_path, **options)
        use_hf_attention(model, config.attn_implementation)
    for layer in attention_layers(transformers_model(model)):
        layer.attention_dropout = 0.0
    transformers_model(model).config.use_cache = False
    return model.to(device)


def merge_adapter(model: Any, adapter: str) -> Any:
    """Merge a LoRA adapter (e.g. the MNTP one) into the weights, returning the plain transformers model."""
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def add_lora(model: Any, config: TrainConfig) -> PeftModel:
    """Wrap `model` with a fresh LoRA adapter (everything else frozen), gradient checkpointing as configured."""
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        bias="none",
        task_type=None,
    )
    missing = [name for name in config.lora_target_modules if not any(n.endswith(f".{name}") for n, _ in model.named_modules())]
    if missing:
        raise ValueError(f"lora_target_modules {missing} match no module of {type(model).__name__}")
    peft_model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
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

    def __init__(self, decoder: nn.Module, lm_head: nn.Linear, *, packed: bool, pad_id: int, chunk_size: int,
                 softcap: float | None = None):
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
        self.packed, self.pad_id, self.pooling_mode, self.skip_instruction = packed, pad_id, pooling_mode, skip_instruction

    def forward(self, batch: ContrastiveBatch) -> Tensor:
        device = next(self.decoder.parameters()).device
        skip = torch.tensor(batch.leading, device=device) if self.skip_instruction else None
        if self.packed:
            packed = pack_sequences(batch.sequences, device)
            hidden = self.decoder(**packed.model_inputs()).last_hidden_state[0]
            return pool_packed(hidden, packed.cu_seqlens, self.pooling_mode, skip)
        input_ids, attention_mask = pad_right(batch.sequences, self.pad_id, device)
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_padded(hidden, attention_mask, self.pooling_mode, skip)


def add_attention_output_dropout(model: nn.Module, probability: float) -> list[Any]:
    """Dropout on each attention block's output (the input of ``o_proj``), active in training mode only.

    SimCSE's positive pairs differ only by dropout; LLM2Vec puts it on the attention probabilities
    (``attention_dropout=0.3``), which our fused kernels do not implement, so on them the noise goes
    on the attention output instead. Returns the hook handles.
    """
    def drop(module: nn.Module, args: tuple) -> tuple:
        return (F.dropout(args[0], probability, module.training), *args[1:])

    return [layer.o_proj.register_forward_pre_hook(drop) for layer in attention_layers(transformers_model(model))]


def build_mntp_model(config: MNTPConfig, tokenizer: PreTrainedTokenizerBase, device: torch.device,
                     vocabulary_grew: bool) -> MaskedNextTokenModel:
    """Bidirectional ``*ForCausalLM`` split into a LoRA-wrapped decoder and its LM head (frozen unless ``lm_head="train"``)."""
    causal_lm = load_decoder(config, AutoModelForCausalLM, device)
    if vocabulary_grew:
        causal_lm.resize_token_embeddings(len(tokenizer))
    lm_head = causal_lm.get_output_embeddings()
    decoder = causal_lm.get_decoder()
    tied = lm_head.weight is decoder.get_input_embeddings().weight
    if config.lm_head == "train" and tied:
        raise ValueError("lm_head='train' is not possible: this model ties its LM head to the input embeddings; use 'freeze'")
    lm_head.weight.requires_grad_(config.lm_head == "train")
    if config.peft_model_name_or_path:
        decoder = merge_adapter(decoder, config.peft_model_name_or_path)
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    return MaskedNextTokenModel(add_lora(decoder, config), lm_head, packed=config.attn_implementation == "llm2vec_fast",
                                pad_id=pad_token_id(tokenizer), chunk_size=config.loss_chunk_size, softcap=softcap)


def build_embedder(config: ContrastiveConfig, tokenizer: PreTrainedTokenizerBase, device: torch.device,
                   dropout: float = 0.0) -> SentenceEmbedder:
    """Bidirectional base model, previous adapter (MNTP) merged, a new LoRA on top; `dropout` as SimCSE's."""
    model = load_decoder(config, AutoModel, device)
    if config.peft_model_name_or_path:
        model = merge_adapter(model, config.peft_model_name_or_path)
    if dropout and config.attn_implementation != "llm2vec_fast":
        for layer in attention_layers(transformers_model(model)):
            layer.attention_dropout = dropout
    model = add_lora(model, config)
    if dropout and config.attn_implementation == "llm2vec_fast":
        add_attention_output_dropout(model, dropout)
    return SentenceEmbedder(model, packed=config.attn_implementation == "llm2vec_fast", pad_id=pad_token_id(tokenizer),
                            pooling_mode=config.pooling_mode, skip_instruction=config.skip_instruction)
