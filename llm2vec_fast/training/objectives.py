"""One call from a config to a trained adapter: ``train(config)``.

Builds the objective's data source, model and loss, runs the `Trainer`, then writes the output
directory the encoder loads: the LoRA adapter, the tokenizer, ``llm2vec_config.json`` (contrastive
objectives), ``lm_head.safetensors`` (MNTP with ``lm_head="train"``), ``train_config.json``, the
loss log and plot, and the ``checkpoint-*`` directories. Local paths are resolved first, so all
of these name them absolutely; the final outputs are staged and moved into place file by file.

The two trainer builders end in the same keyword call of `Trainer`, each with its own model, source
and loss; the keyword lines repeat, the wiring does not.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import AutoConfig, PreTrainedTokenizerBase

from ..atomic_files import TEMPORARY_SUFFIX, publish_files, remove_directory
from ..loading import CONFIG_NAME, ENCODER_DEFAULTS
from ..runtime import check_backend, check_device
from .checkpoint import save_weights
from .config import ContrastiveConfig, MNTPConfig, SimCSEConfig, SupervisedConfig, TrainConfig
from .data.batches import ContrastiveBatch
from .data.masking import add_mask_token, masking_rule
from .data.records import TextLines, contrastive_files
from .data.sources import MNTPSource, SimCSESource, SupervisedSource
from .distributed_strategy import TrainedWeights, check_launcher
from .loop import Trainer, TrainingResult
from .losses import contrastive_loss_sum
from .modeling import build_embedder, build_mntp_model, decoder_spec, load_tokenizer
from .process_group import Topology, barrier, init_topology
from .run_directory import TRAIN_CONFIG_FILE, ResumePoint, start_run


def contrastive_batch_loss(model: nn.Module, batch: ContrastiveBatch, scale: float) -> Tensor:
    """Loss sum of a contrastive batch: embed all its sequences in one pass, then queries vs documents."""
    embeddings = model(batch)
    queries = batch.num_queries
    return contrastive_loss_sum(
        embeddings[:queries], embeddings[queries : 2 * queries], embeddings[2 * queries :], scale
    )


def _mntp_trainer(
    config: MNTPConfig, tokenizer: PreTrainedTokenizerBase, topology: Topology, resume: ResumePoint | None
) -> Trainer:
    model_type = AutoConfig.from_pretrained(config.model_name_or_path).model_type
    vocabulary_grew = add_mask_token(tokenizer, config.mask_token_type)
    rule = masking_rule(tokenizer, *config.masking_for(model_type))
    source = MNTPSource(
        TextLines(config.train_files),
        tokenizer,
        rule,
        layout=config.data_layout,
        max_seq_length=config.max_seq_length,
        batch_size=config.per_device_train_batch_size,
        max_tokens_per_batch=config.max_tokens_per_batch,
        seed=config.seed,
        rank=topology.rank,
        world_size=topology.world_size,
    )
    spec = decoder_spec(config, topology.device)
    train_lm_head = config.lm_head == "train"
    model = build_mntp_model(
        spec, tokenizer, vocabulary_grew=vocabulary_grew, train_lm_head=train_lm_head, chunk_size=config.loss_chunk_size
    )
    _seed_per_process(config.seed, topology)
    return Trainer(
        config,
        topology,
        model=model,
        adapter=model.decoder,
        source=source,
        loss_sum=lambda module, batch: module(batch),
        weights_dtype=spec.dtype,
        resume=resume,
        lm_head=model.lm_head if train_lm_head else None,
    )


def _contrastive_trainer(
    config: ContrastiveConfig, tokenizer: PreTrainedTokenizerBase, topology: Topology, resume: ResumePoint | None
) -> Trainer:
    options = dict(
        max_seq_length=config.max_seq_length,
        batch_size=config.per_device_train_batch_size,
        append_eos=config.pooling_mode == "eos_token",
        template=config.text_template,
        seed=config.seed,
        rank=topology.rank,
        world_size=topology.world_size,
    )
    if isinstance(config, SimCSEConfig):
        source = SimCSESource(TextLines(config.train_files), tokenizer, **options)
        dropout = config.simcse_dropout
    else:
        datasets = contrastive_files(config.train_files, config.instructions, config.validate_data)
        source = SupervisedSource(datasets, tokenizer, **options)
        dropout = 0.0
    spec = decoder_spec(config, topology.device)
    model = build_embedder(
        spec, tokenizer, pooling_mode=config.pooling_mode, skip_instruction=config.skip_instruction, dropout=dropout
    )
    _seed_per_process(config.seed, topology)
    return Trainer(
        config,
        topology,
        model=model,
        adapter=model.decoder,
        source=source,
        loss_sum=partial(contrastive_batch_loss, scale=config.loss_scale),
        weights_dtype=spec.dtype,
        resume=resume,
    )


def _seed_per_process(seed: int, topology: Topology) -> None:
    """After the (identically seeded) model build, give each process its own dropout noise."""
    torch.manual_seed(seed + topology.rank)


def _settings_files(config: TrainConfig) -> dict[str, str]:
    """The JSON files of the output directory besides the adapter: the run's config, and the encoder's settings."""
    files = {TRAIN_CONFIG_FILE: json.dumps(config.to_dict(), indent=2)}
    if isinstance(config, ContrastiveConfig):
        encoder = {
            **ENCODER_DEFAULTS,
            "pooling_mode": config.pooling_mode,
            "max_length": config.max_seq_length,
            "skip_instruction": config.skip_instruction,
        }
        files[CONFIG_NAME] = json.dumps(encoder, indent=4)
    return files


def _write_outputs(
    output: Path,
    adapter: PeftModel,
    weights: TrainedWeights,
    tokenizer: PreTrainedTokenizerBase,
    settings_files: dict[str, str],
) -> None:
    """Write the final outputs beside the checkpoints: staged, then each file moved into place whole."""
    staging = output / f"final-outputs{TEMPORARY_SUFFIX}"
    remove_directory(staging)
    staging.mkdir()
    save_weights(staging, adapter, weights)
    tokenizer.save_pretrained(staging)
    for name, text in settings_files.items():
        (staging / name).write_text(text)
    publish_files(staging, output)


def train(config: TrainConfig) -> TrainingResult:
    """Train `config.objective` and write the adapter to ``config.output_dir`` (every process calls this under
    DDP/FSDP)."""
    config = config.with_resolved_paths()
    check_device(config.device)  # a missing GPU or backend: one ValueError naming it, before anything loads
    check_backend(config.attention_backend if config.attn_implementation == "llm2vec_fast" else None, config.device)
    check_launcher(config.distributed_strategy)
    topology = init_topology(config.device)
    resume = start_run(config, topology)
    torch.manual_seed(config.seed)
    tokenizer = load_tokenizer(config.model_name_or_path)
    if isinstance(config, MNTPConfig):
        trainer = _mntp_trainer(config, tokenizer, topology, resume)
    elif isinstance(config, (SimCSEConfig, SupervisedConfig)):
        trainer = _contrastive_trainer(config, tokenizer, topology, resume)
    else:
        raise TypeError(f"unknown training config {type(config).__name__}")
    result = trainer.train()
    weights = trainer.gather_weights()
    if topology.is_main:
        _write_outputs(Path(config.output_dir), trainer.adapter, weights, tokenizer, _settings_files(config))
    barrier()
    return result
