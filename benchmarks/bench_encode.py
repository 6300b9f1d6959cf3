"""End-to-end encoding throughput: llm2vec_fast (packed tokens, our kernels) vs HF SDPA bidirectional.

Encodes a realistic length mix (log-normal lengths, median ~60 tokens, clipped to [4, 512]; random
token ids, so tokenization is not timed) with Mistral-7B- and Llama-3-8B-shaped decoders in bf16
(random weights; ``--layers`` decoder layers, 32 = full depth), pooled with mean pooling:

- ``llm2vec_fast``: batches packed into one row of real tokens (``pack_sequences``), attention by
  our varlen op, mean pooling on the packed tokens: what ``LLM2Vec.encode`` runs per batch;
- ``llm2vec_fast (token budget)``: the same, batches filled to ``--max-batch-tokens`` tokens;
- ``sdpa``: HF SDPA with ``is_causal=False`` on left-padded batches with a padding mask, mean over
  real tokens: what the official llm2vec does;
- ``flash_attention_2``: HF's flash-attn 2 path, padded batches (only if ``flash_attn`` is installed).

All methods see the same texts, sorted by length (as llm2vec sorts) and cut into ``--batch-size``
batches. Reported: real tokens/s, peak GPU memory, speedup over SDPA, and the worst cosine
similarity of our embeddings to SDPA's. Writes JSON + markdown under benchmarks/results/. Needs a
CUDA GPU: on a machine without one it says so and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reporting import environment, markdown_table, require_gpu, write_results  # noqa: E402

SHAPES = {
    "mistral-7b": dict(
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=32000,
        rope_theta=1e6,
        sliding_window=None,
    ),
    "llama-3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        rope_theta=5e5,
    ),
}


def length_mix(count: int, median: int, maximum: int, seed: int) -> list[int]:
    """Log-normal lengths (sigma 0.8 around `median`), clipped to [4, maximum]."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(median) + 0.8 * torch.randn(count, generator=generator))
    return lengths.round().clamp(4, maximum).long().tolist()


def build_model(name: str, layers: int):
    from transformers import AutoConfig, AutoModel

    shape = dict(SHAPES[name])
    model_type = shape.pop("model_type")
    rope_theta = shape.pop("rope_theta")
    config = AutoConfig.for_model(model_type, num_hidden_layers=layers, max_position_embeddings=4096, **shape)
    config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    with torch.device("cuda"):
        model = AutoModel.from_config(copy.deepcopy(config), dtype=torch.bfloat16)
    return model.eval()


def run_ours(model, sequences, batches) -> torch.Tensor:
    from llm2vec_fast.hf import pack_sequences
    from llm2vec_fast.pooling import pool_packed

    out = torch.empty(len(sequences), model.config.hidden_size, device="cuda")
    for batch in batches:
        packed = pack_sequences([sequences[i] for i in batch], device="cuda")
        hidden = model(**packed.model_inputs()).last_hidden_state[0]
        out[torch.tensor(batch, device="cuda")] = pool_packed(hidden, packed.cu_seqlens, "mean")
    return out


def run_padded(model, sequences, batches) -> torch.Tensor:
    """Left-padded batches with a padding mask, mean over real tokens (the official llm2vec's way)."""
    out = torch.empty(len(sequences), model.config.hidden_size, device="cuda")
    for batch in batches:
        width = max(len(sequences[i]) for i in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, index in enumerate(batch):
            tokens = sequences[index]
            ids[row, width - len(tokens) :] = torch.tensor(tokens)
            mask[row, width - len(tokens) :] = 1
        ids, mask = ids.cuda(), mask.cuda()
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).float()
        out[torch.tensor(batch, device="cuda")] = (hidden * weights).sum(1) / weights.sum(1)
    return out


def measure(fn, model, sequences, batches, repeats: int) -> dict:
    with torch.no_grad():
        fn(model, sequences, batches[:2])  # warm-up: kernels compiled, allocator primed
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        best = float("inf")
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            embeddings = fn(model, sequences, batches)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
    tokens = sum(len(s) for s in sequences)
    return {
        "seconds": best,
        "tokens_per_second": tokens / best,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "embeddings": embeddings,
    }


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    from llm2vec_fast.encoder import plan_batches
    from llm2vec_fast.hf import enable_bidirectional

    model = build_model(name, args.layers)
    lengths = length_mix(args.num_texts, args.median, args.max_length, args.seed)
    generator = torch.Generator().manual_seed(args.seed + 1)
    sequences = [torch.randint(3, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    batches = plan_batches(lengths, args.batch_size)  # longest first, as llm2vec sorts
    budget = plan_batches(lengths, batch_size=10**6, max_batch_tokens=args.max_batch_tokens)

    runs = []
    enable_bidirectional(model, backend=args.backend)
    runs.append(("llm2vec_fast", measure(run_ours, model, sequences, batches, args.repeats)))
    budget_name = f"llm2vec_fast (token budget {args.max_batch_tokens})"
    runs.append((budget_name, measure(run_ours, model, sequences, budget, args.repeats)))
    implementations = ["sdpa"]
    try:
        import flash_attn  # noqa: F401

        implementations.append("flash_attention_2")
    except ImportError:
        pass
    for implementation in implementations:
        model.set_attn_implementation(implementation)
        model.config.is_causal = False
        runs.append((implementation, measure(run_padded, model, sequences, batches, args.repeats)))

    reference = dict(runs)["sdpa"]
    rows = []
    for method, result in runs:
        cosine = torch.nn.functional.cosine_similarity(result["embeddings"], reference["embeddings"], dim=-1)
        rows.append(
            {
                "model": name,
                "layers": args.layers,
                "num_texts": args.num_texts,
                "batch_size": args.batch_size,
                "method": method,
                "tokens_per_second": round(result["tokens_per_second"]),
                "seconds": round(result["seconds"], 4),
                "peak_memory_gib": round(result["peak_memory_gib"], 2),
                "speedup_vs_sdpa": round(result["tokens_per_second"] / reference["tokens_per_second"], 3),
                "min_cosine_vs_sdpa": round(cosine.min().item(), 5),
            }
        )
    del model
    torch.cuda.empty_cache()
    return rows


COLUMNS = ["model", "method", "tokens_per_second", "speedup_vs_sdpa", "peak_memory_gib", "min_cosine_vs_sdpa"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mistral-7b,llama-3-8b", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = full depth)")
    parser.add_argument("--num-texts", type=int, default=4096)
    parser.add_argument("--median", type=int, default=60)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backend", default=None, help="force an llm2vec_fast attention backend")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results file stem (default: encode_<device>)")
    args = parser.parse_args(argv)
    if not require_gpu("bench_encode"):
        return 0
    unknown = set(args.models.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown model shapes {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    rows = []
    for name in args.models.split(","):
        model_rows = bench_model(name, args)
        for row in model_rows:
            print(json.dumps(row))
        rows.extend(model_rows)
    env = environment()
    settings = (
        f"{args.num_texts} texts, log-normal lengths (median {args.median}, max {args.max_length}), random weights in"
        f" bf16, {args.layers} decoder layers, mean pooling, batch size {args.batch_size} sorted by length, token"
        f" budget {args.max_batch_tokens}. Tokens/s counts real tokens only; best of {args.repeats} runs."
    )
    name = args.name or "encode_" + env["device"].replace(" ", "_").lower()
    stem = write_results(name, env, rows, settings + "\n\n" + markdown_table(rows, COLUMNS))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
