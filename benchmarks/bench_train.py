"""Conversion-training step throughput and peak memory: llm2vec_fast vs Hugging Face SDPA bidirectional.

A Mistral-7B-shaped decoder (hidden 4096, 14336 MLP, 32 query / 8 KV heads, head_dim 128, vocabulary
32000; random weights in bf16; ``--layers`` decoder layers, 32 = full depth) with LoRA r=16 on
q/k/v/o/gate/up/down (fp32 adapters, as peft keeps them) and non-reentrant gradient checkpointing.
One full optimizer step (forward, backward, AdamW on the adapters) is timed per batch, for:

- ``mntp (lines)``: 32 sequences per batch, log-normal lengths (median ``--median``, clipped to
  [16, 512]), Mistral's masking (80% of tokens, all replaced by the mask token);
- ``mntp (concat 512)``: 32 full 512-token blocks (LLM2Vec's default layout: no padding at all);
- ``simcse``: 128 sentences (median 30 tokens, clipped to [8, 128]) encoded twice, mean pooling,
  scale 20, dropout 0.3 (SDPA: on the attention probabilities; ours: on the attention output).

Methods:
- ``llm2vec_fast``: the trainer's own modules (packed tokens through our varlen attention; MNTP
  evaluates the LM head at masked positions only, in chunks);
- ``hf_sdpa``: HF SDPA with ``is_causal=False`` on right-padded batches with a padding mask; MNTP is
  ``*ForCausalLM(..., labels=...)`` (full-vocabulary logits, HF's loss), as the official scripts run it.

Before timing, both methods compute the loss of the same batch (dropout off) and must agree.
Reported: real tokens/s (padding is never counted), peak GPU memory, ratios to SDPA. Writes JSON +
markdown under benchmarks/results/. Needs a CUDA GPU: without one it says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
MISTRAL_7B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=32000,
    sliding_window=None,
)
MASK_TOKEN_ID = 28730  # Mistral's "_"; any id works on random weights


def length_mix(count: int, median: int, low: int, high: int, seed: int) -> list[int]:
    """Log-normal lengths (sigma 0.8 around `median`), clipped to [low, high]."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(median) + 0.8 * torch.randn(count, generator=generator))
    return lengths.round().clamp(low, high).long().tolist()


def build_causal_lm(layers: int, device: str, shape: dict | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "mistral",
        num_hidden_layers=layers,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        **(shape or MISTRAL_7B),
    )
    config.use_cache = False
    with torch.device(device):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.bfloat16)


def lora_settings():
    """The LoRA adapter of a default training run."""
    from llm2vec_fast.training.config import MNTPConfig
    from llm2vec_fast.training.modeling import lora_config

    return lora_config(MNTPConfig(model_name_or_path="random", train_files=["-"], output_dir="-"))


def mntp_batch(lengths: list[int], vocab: int, seed: int):
    """Random sequences masked as Mistral's MNTP (p = 0.8, all mask token)."""
    from llm2vec_fast.training.data.batches import MNTPBatch
    from llm2vec_fast.training.data.masking import MaskingRule, prediction_targets

    rule = MaskingRule(0.8, "all_mask", MASK_TOKEN_ID, vocab, np.asarray([1, 2], dtype=np.int64))
    rng = np.random.default_rng(seed)
    sequences, rows, cols, ids = [], [], [], []
    for row, length in enumerate(lengths):
        original = rng.integers(3, vocab, size=length)
        original[0] = 1
        corrupted, selected = rule.apply(original, rng)
        targets = prediction_targets(selected)
        sequences.append(corrupted.tolist())
        rows.append(np.full(targets.size, row))
        cols.append(targets)
        ids.append(original[targets])
    return MNTPBatch(sequences, np.concatenate(rows), np.concatenate(cols), np.concatenate(ids))


def simcse_batch(lengths: list[int], vocab: int, seed: int, shift_positives: bool = False):
    """Sentences twice (SimCSE); with `shift_positives` each query's positive is the next sentence (a non-trivial
    loss to compare)."""
    from llm2vec_fast.training.data.batches import ContrastiveBatch

    rng = np.random.default_rng(seed)
    sentences = [[1, *rng.integers(3, vocab, size=n - 1).tolist()] for n in lengths]
    positives = sentences[1:] + sentences[:1] if shift_positives else sentences
    return ContrastiveBatch(
        sentences + [list(s) for s in positives], [1] * (2 * len(sentences)), num_queries=len(sentences)
    )


def _padded(sequences: list[list[int]], device: str):
    from llm2vec_fast.training.data.batches import pad_right

    return pad_right(sequences, 0, device)


class Stepper:
    """Forward, backward and AdamW step of one method on one batch; ``loss(batch)`` without dropout for the sanity
    check."""

    def __init__(self, module, loss_fn):
        self.module, self.loss_fn = module, loss_fn
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)

    def step(self, batch) -> None:
        self.loss_fn(self.module, batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def loss(self, batch) -> float:
        was_training = self.module.training
        self.module.eval()
        value = float(self.loss_fn(self.module, batch))
        self.module.train(was_training)
        return value


def mntp_steppers(layers: int, device: str, shape: dict | None = None) -> dict[str, Stepper]:
    """Ours and HF SDPA sharing one LoRA-wrapped causal LM (the attention implementation is switched per method)."""
    from llm2vec_fast.hf import enable_bidirectional
    from llm2vec_fast.training.modeling import MaskedNextTokenModel, add_lora, use_hf_attention

    causal_lm = build_causal_lm(layers, device, shape)
    causal_lm.lm_head.weight.requires_grad_(False)
    decoder = add_lora(causal_lm.model, lora_settings(), gradient_checkpointing=True)
    causal_lm.model = decoder
    ours = MaskedNextTokenModel(decoder, causal_lm.lm_head, packed=True, pad_id=0, chunk_size=4096)

    def ours_loss(module, batch):
        enable_bidirectional(decoder)
        return module(batch) / batch.num_loss_terms

    def sdpa_loss(module, batch):
        use_hf_attention(decoder, "sdpa")
        input_ids, attention_mask = _padded(batch.sequences, device)
        labels = torch.full_like(input_ids, -100)
        labels[torch.from_numpy(batch.target_rows), torch.from_numpy(batch.target_cols)] = torch.from_numpy(
            batch.target_ids
        ).to(device)
        return module(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss

    return {"llm2vec_fast": Stepper(ours.train(), ours_loss), "hf_sdpa": Stepper(causal_lm.train(), sdpa_loss)}


def simcse_steppers(layers: int, device: str, shape: dict | None = None, dropout: float = 0.3) -> dict[str, Stepper]:
    from llm2vec_fast.hf import enable_bidirectional, transformers_model
    from llm2vec_fast.hf.patching import attention_layers
    from llm2vec_fast.pooling import pool_padded
    from llm2vec_fast.training.modeling import (
        SentenceEmbedder,
        add_attention_output_dropout,
        add_lora,
        use_hf_attention,
    )
    from llm2vec_fast.training.objectives import contrastive_batch_loss

    decoder = add_lora(build_causal_lm(layers, device, shape).model, lora_settings(), gradient_checkpointing=True)
    ours = SentenceEmbedder(decoder, packed=True, pad_id=0, pooling_mode="mean", skip_instruction=True)
    hooks = add_attention_output_dropout(decoder, dropout)

    def set_mode(sdpa: bool) -> None:
        for hook in hooks:  # ours: dropout after attention; SDPA: dropout inside attention
            hook.remove()
        hooks.clear()
        if sdpa:
            use_hf_attention(decoder, "sdpa")
        else:
            enable_bidirectional(decoder)
            hooks.extend(add_attention_output_dropout(decoder, dropout))
        for layer in attention_layers(transformers_model(decoder)):
            layer.attention_dropout = dropout if sdpa else 0.0

    def ours_loss(module, batch):
        set_mode(sdpa=False)
        return contrastive_batch_loss(module, batch, scale=20.0) / batch.num_queries

    class PaddedEmbedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = decoder

        def forward(self, batch):
            input_ids, attention_mask = _padded(batch.sequences, device)
            hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return pool_padded(hidden, attention_mask, "mean", torch.tensor(batch.instruction_lengths, device=device))

    def sdpa_loss(module, batch):
        set_mode(sdpa=True)
        return contrastive_batch_loss(module, batch, scale=20.0) / batch.num_queries

    return {"llm2vec_fast": Stepper(ours.train(), ours_loss), "hf_sdpa": Stepper(PaddedEmbedder().train(), sdpa_loss)}


def measure(stepper: Stepper, batches: list, warmup: int) -> dict:
    for batch in batches[:warmup]:
        stepper.step(batch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        stepper.step(batch)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(batch.num_tokens for batch in batches[warmup:])
    return {
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def workloads(args: argparse.Namespace, vocab: int) -> dict[str, tuple[list, object]]:
    """Per workload: the timed batches and a batch for the loss-agreement check."""
    count = args.warmup + args.steps
    lines = [mntp_batch(length_mix(32, args.median, 16, 512, args.seed + i), vocab, i) for i in range(count)]
    blocks = [mntp_batch([512] * 32, vocab, i) for i in range(count)]
    simcse = [simcse_batch(length_mix(128, 30, 8, 128, args.seed + i), vocab, i) for i in range(count)]
    check = simcse_batch(length_mix(128, 30, 8, 128, args.seed), vocab, 0, shift_positives=True)
    return {"mntp (lines)": (lines, lines[0]), "mntp (concat 512)": (blocks, blocks[0]), "simcse": (simcse, check)}


def bench(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, (batches, check) in workloads(args, MISTRAL_7B["vocab_size"]).items():
        steppers = (mntp_steppers if name.startswith("mntp") else simcse_steppers)(args.layers, "cuda")
        sanity = {method: stepper.loss(check) for method, stepper in steppers.items()}
        results = {}
        for method, stepper in steppers.items():
            try:
                results[method] = measure(stepper, batches, args.warmup)
            except torch.OutOfMemoryError:
                results[method] = None
            torch.cuda.empty_cache()
        baseline = results["hf_sdpa"]
        for method, result in results.items():
            row = {
                "workload": name,
                "layers": args.layers,
                "method": method,
                "loss_same_batch": round(sanity[method], 5),
                "real_tokens_per_step": round(sum(b.num_tokens for b in batches) / len(batches)),
            }
            if result is None:
                row.update(tokens_per_second=None, peak_memory_gib=None, speedup_vs_sdpa=None, memory_vs_sdpa=None)
            else:
                row.update(
                    tokens_per_second=round(result["tokens_per_second"]),
                    peak_memory_gib=round(result["peak_memory_gib"], 2),
                    speedup_vs_sdpa=round(result["tokens_per_second"] / baseline["tokens_per_second"], 3)
                    if baseline
                    else None,
                    memory_vs_sdpa=round(result["peak_memory_gib"] / baseline["peak_memory_gib"], 3)
                    if baseline
                    else None,
                )
            rows.append(row)
            print(json.dumps(row))
        del steppers
        torch.cuda.empty_cache()
    return rows


def environment() -> dict:
    import peft
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(rows: list[dict], env: dict, args: argparse.Namespace) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = env["device"].lower().replace(" ", "_").replace("/", "_")
    stem = RESULTS / f"bench_train_{slug}"
    stem.with_suffix(".json").write_text(
        json.dumps({"environment": env, "settings": vars(args), "results": rows}, indent=2) + "\n"
    )

    def cell(value, fmt):
        return "OOM" if value is None else format(value, fmt)

    lines = [
        f"# Training step throughput on {env['device']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, transformers {env['transformers']}, "
        f"peft {env['peft']}; {env['date']}.",
        f"Mistral-7B shape with {args.layers} decoder layers (32 = full depth), random bf16 weights, LoRA r=16 on all "
        f"projections, gradient checkpointing; {args.steps} timed optimizer steps after {args.warmup} warm-up steps. "
        "Tokens/s counts real tokens only.",
        "",
        "| workload | method | real tokens/step | tokens/s | speedup vs SDPA | peak memory (GiB) | memory vs SDPA"
        " | loss (same batch) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['workload']} | {row['method']} | {row['real_tokens_per_step']:,}"
            f" | {cell(row['tokens_per_second'], ',')} |"
            f" {cell(row['speedup_vs_sdpa'], '.2f')}x | {cell(row['peak_memory_gib'], '.2f')} |"
            f" {cell(row['memory_vs_sdpa'], '.2f')}x | {row['loss_same_batch']:.4f} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = full Mistral-7B depth)")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per workload and method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--median", type=int, default=128, help="median sequence length of the MNTP 'lines' workload")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train needs a CUDA GPU; none found, nothing measured.")
        return 0
    rows = bench(args)
    stem = write_results(rows, environment(), args)
    print(f"results written to {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
