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

``--device cpu`` times the whole ``encode`` API instead (tokenization included) on a small random Llama
(``--layers`` 4, hidden 256, 4 heads of 64, 2 KV heads, float32) and real texts of a log-normal word-count
mix. Each method is warmed up once, then the methods take turns, one full encode each per round, and the
median of ``--repeats`` rounds is reported, so that load from other processes falls on every method alike:

- ``llm2vec_fast (auto: cpu)``: ``LLM2Vec.encode``, attention by torch's fused CPU kernel (backends/cpu.py), RMSNorm,
  SwiGLU and rotary embedding by the fused CPU ops (llm2vec_fast/cpu_fused.py);
- ``llm2vec_fast (reference)``: the same with the exact reference attention backend forced;
- ``hf sdpa``: the same weights, text preparation and tokenization (official-format features, left-padded,
  batches sorted by length), HF SDPA attention with ``is_causal=False``, mean over the text: the official
  library's way on the current transformers;
- ``llm2vec 0.2.3``: the official ``LLM2Vec.encode`` on the same saved model, in the interpreter given by
  ``--official-python`` (a venv with llm2vec 0.2.3 and its transformers 4.44), a fresh process each round
  (which warms up, then times one encode).
Threads are pinned (``--threads``) in every process; the load average is recorded with the results. Each
round records wall-clock and CPU seconds (``time.process_time`` of the encoding process, all its threads): on a
shared machine the wall clock also counts the time other processes held the cores, so the speedups are taken
from the CPU seconds and the wall-clock ones are reported beside them. CPU seconds still vary with what shares
the physical cores (the same encode took 4.5-6.1 s within minutes on the 2-core VM these numbers come from), so
beside the ratio of medians come the paired speedup (the median of each round's ratio) and the best-round one.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
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

# ---------------------------------------------------------------------------------------------- CPU: encode API

CPU_SHAPE = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
ORACLE_TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "data" / "llm2vec_oracle" / "llama"
"""The tokenizer files of the llm2vec 0.2.3 fixtures (``llm2vec_fast.tiny``'s tokenizer, saved so that
transformers 4.44 reads it too, see tests/data/llm2vec_oracle/make_oracle.py)."""
OFFICIAL = "llm2vec 0.2.3"
CPU_COLUMNS = [
    "method",
    "texts_per_second",
    "tokens_per_second",
    "median_cpu_seconds",
    "median_seconds",
    "speedup_vs_official",
    "paired_speedup_vs_official",
    "best_speedup_vs_official",
    "wall_speedup_vs_official",
    "speedup_vs_sdpa",
    "min_cosine_vs_reference",
]


def save_cpu_model(directory: Path, layers: int) -> None:
    """The small random Llama with the fixtures' tokenizer, in a form transformers 5 and 4.44 both load."""
    from llm2vec_fast.tiny import build_tiny_model

    model, _ = build_tiny_model("llama", seed=0, num_hidden_layers=layers, **CPU_SHAPE)
    model.model.save_pretrained(directory)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    config.update(rope_theta=rope_theta, rope_scaling=None, torch_dtype="float32")
    config_file.write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ORACLE_TOKENIZER / name, directory / name)


def cpu_texts(count: int, median_words: int, seed: int) -> list[str]:
    """Texts of log-normal word counts (sigma 0.8 around `median_words`, 2 to 400 words) from the tiny corpus."""
    from llm2vec_fast.tiny import CORPUS

    words = " ".join(CORPUS).split()
    rng = random.Random(seed)
    counts = [min(400, max(2, round(math.exp(math.log(median_words) + 0.8 * rng.gauss(0, 1))))) for _ in range(count)]
    return [" ".join(rng.choice(words) for _ in range(n)) for n in counts]


def encode_ours(model_dir: Path, backend: str | None):
    """A timed function: our ``LLM2Vec.encode`` with attention `backend` (None = auto)."""
    from llm2vec_fast import LLM2Vec

    encoder = LLM2Vec.from_pretrained(str(model_dir), attention_backend=backend, pooling_mode="mean")
    return lambda texts, batch_size: encoder.encode(texts, batch_size=batch_size, show_progress_bar=False)


def encode_sdpa(model_dir: Path):
    """A timed function: texts prepared and tokenized as llm2vec does (our ``LLM2Vec.tokenize``: official-format
    left-padded features), HF SDPA bidirectional on those padded batches sorted by length, mean over the text."""
    from transformers import AutoModel

    from llm2vec_fast import LLM2Vec

    model = AutoModel.from_pretrained(str(model_dir), attn_implementation="sdpa").eval()
    model.config.is_causal = False
    text_side = LLM2Vec.from_pretrained(str(model_dir), pooling_mode="mean")  # its tokenizer and text preparation
    text_side.tokenizer.pad_token, text_side.tokenizer.padding_side = text_side.tokenizer.eos_token, "left"

    @torch.inference_mode()
    def encode(texts: list[str], batch_size: int) -> torch.Tensor:
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty(len(texts), model.config.hidden_size)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            features = text_side.tokenize(text_side.prepare_texts([("", texts[i]) for i in batch]))
            hidden = model(input_ids=features["input_ids"], attention_mask=features["attention_mask"]).last_hidden_state
            weights = features["embed_mask"].unsqueeze(-1).float()
            out[torch.tensor(batch)] = (hidden * weights).sum(1) / weights.sum(1)
        return out

    return encode


def official_worker(job_file: str) -> int:
    """Under the official library's interpreter: warm up, time one ``LLM2Vec.encode``, save its embeddings."""
    from llm2vec import LLM2Vec

    job = json.loads(Path(job_file).read_text())
    torch.set_num_threads(job["threads"])
    encoder = LLM2Vec.from_pretrained(job["model_dir"], torch_dtype=torch.float32, pooling_mode="mean")
    texts, batch_size = job["texts"], job["batch_size"]
    encoder.encode(texts[: 2 * batch_size], batch_size=batch_size, show_progress_bar=False)
    start, cpu_start = time.perf_counter(), time.process_time()
    embeddings = encoder.encode(texts, batch_size=batch_size, show_progress_bar=False, convert_to_tensor=True)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    torch.save(embeddings.float(), job["embeddings"])
    import llm2vec
    import transformers

    versions = {"llm2vec": getattr(llm2vec, "__version__", "0.2.3"), "transformers": transformers.__version__}
    Path(job["result"]).write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "versions": versions}))
    return 0


def encode_official(python: str, model_dir: Path, threads: int, workdir: Path, versions: dict):
    """A timed function running :func:`official_worker` in `python`: it returns the embeddings and the (wall, CPU)
    seconds the worker measured, and records the worker's library versions in `versions`."""
    paths = {name: str(workdir / name) for name in ("job.json", "result.json", "embeddings.pt")}

    def encode(texts: list[str], batch_size: int) -> tuple[torch.Tensor, tuple[float, float]]:
        job = dict(
            model_dir=str(model_dir),
            texts=texts,
            batch_size=batch_size,
            threads=threads,
            result=paths["result.json"],
            embeddings=paths["embeddings.pt"],
        )
        Path(paths["job.json"]).write_text(json.dumps(job))
        env = dict(os.environ, PYTHONPATH="", TOKENIZERS_PARALLELISM="false")
        command = [python, str(Path(__file__).resolve()), "--official-worker", paths["job.json"]]
        subprocess.run(command, check=True, env=env, cwd=str(workdir), capture_output=True)
        result = json.loads(Path(paths["result.json"]).read_text())
        versions.update(result["versions"])
        return torch.load(paths["embeddings.pt"]), (result["seconds"], result["cpu_seconds"])

    return encode


def bench_cpu(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    texts = cpu_texts(args.num_texts, args.median_words, args.seed)
    with tempfile.TemporaryDirectory() as temp:
        model_dir = Path(temp) / "model"
        save_cpu_model(model_dir, args.layers)
        methods = {
            "llm2vec_fast (auto: cpu)": encode_ours(model_dir, None),
            "llm2vec_fast (reference)": encode_ours(model_dir, "reference"),
            "hf sdpa": encode_sdpa(model_dir),
        }
        versions: dict = {}
        if args.official_python:
            methods[OFFICIAL] = encode_official(args.official_python, model_dir, args.threads, Path(temp), versions)
        from llm2vec_fast import LLM2Vec

        lengths = LLM2Vec.from_pretrained(str(model_dir)).token_lengths(texts)
        tokens, padded = sum(lengths), padded_tokens(texts, lengths, args.batch_size)
        for name, encode in methods.items():
            if name != OFFICIAL:
                encode(texts[: 2 * args.batch_size], args.batch_size)  # warm-up (the official worker warms itself)
        seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in methods}
        embeddings = {}
        for _ in range(args.repeats):
            for name, encode in methods.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                result = encode(texts, args.batch_size)
                elapsed = (time.perf_counter() - start, time.process_time() - cpu_start)
                if name == OFFICIAL:
                    result, elapsed = result
                embeddings[name] = torch.as_tensor(result).float()
                seconds[name].append(elapsed)
    rows = cpu_rows(seconds, embeddings, len(texts), tokens)
    for row in rows:
        print(json.dumps(row))
    env = environment()
    env.update(
        cpu_model=cpu_model(),
        torch_threads=args.threads,
        load_average_before=[round(x, 2) for x in load_before],
        load_average_after=[round(x, 2) for x in os.getloadavg()],
        official=versions or None,
    )
    settings = (
        f"`LLM2Vec.encode` of {len(texts)} texts ({tokens} tokens; log-normal word counts, median"
        f" {args.median_words} words), random Llama: {args.layers} layers, hidden 256, 4 heads x 64, 2 KV heads,"
        f" float32, mean pooling, batch size {args.batch_size}, {args.threads} torch thread(s). Padded batches as"
        f" llm2vec sorts them hold {padded} tokens ({padded / tokens:.2f}x the real ones). Median of"
        f" {args.repeats} rounds after one warm-up, methods interleaved in each round (every round's seconds are"
        " in the JSON); throughput and speedups from CPU seconds of the encoding process. The machine was shared"
        f" with other processes (load average {env['load_average_before']} before, {env['load_average_after']}"
        " after)."
    )
    stem = write_results(args.name or "encode_cpu", env, rows, settings + "\n\n" + markdown_table(rows, CPU_COLUMNS))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


def padded_tokens(texts: list[str], lengths: list[int], batch_size: int) -> int:
    """Tokens of the padded batches the official encoder builds: texts sorted by character length, longest first."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def cpu_rows(seconds: dict, embeddings: dict, num_texts: int, tokens: int) -> list[dict]:
    """One row per method from its rounds' (wall, CPU) seconds: throughput and speedups from the median CPU
    seconds, the paired (median of per-round ratios) and best-round (fastest round against fastest round) CPU
    speedups, the wall-clock median and speedup beside them."""
    wall = {name: statistics.median(w for w, _ in rounds) for name, rounds in seconds.items()}
    cpu = {name: statistics.median(c for _, c in rounds) for name, rounds in seconds.items()}
    reference = embeddings["llm2vec_fast (reference)"]

    def paired(name: str) -> float | None:
        """The median over rounds of official / this method's CPU seconds in the same round: load that drifts
        over minutes falls on both sides of each ratio."""
        if OFFICIAL not in seconds:
            return None
        ratios = [official[1] / ours[1] for official, ours in zip(seconds[OFFICIAL], seconds[name])]
        return round(statistics.median(ratios), 2)

    rows = []
    for name in seconds:
        cosine = torch.nn.functional.cosine_similarity(embeddings[name], reference, dim=-1)
        row = {
            "method": name,
            "texts_per_second": round(num_texts / cpu[name], 1),
            "tokens_per_second": round(tokens / cpu[name]),
            "median_cpu_seconds": round(cpu[name], 3),
            "median_seconds": round(wall[name], 3),
            "speedup_vs_official": round(cpu[OFFICIAL] / cpu[name], 2) if OFFICIAL in cpu else None,
            "paired_speedup_vs_official": paired(name),
            "best_speedup_vs_official": (
                round(min(c for _, c in seconds[OFFICIAL]) / min(c for _, c in seconds[name]), 2)
                if OFFICIAL in cpu
                else None
            ),
            "wall_speedup_vs_official": round(wall[OFFICIAL] / wall[name], 2) if OFFICIAL in wall else None,
            "speedup_vs_sdpa": round(cpu["hf sdpa"] / cpu[name], 2),
            "min_cosine_vs_reference": round(cosine.min().item(), 6),
            "seconds_per_round": [round(w, 3) for w, _ in seconds[name]],
            "cpu_seconds_per_round": [round(c, 3) for _, c in seconds[name]],
        }
        rows.append(row)
    return rows


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"unknown ({os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: the encode API, see above")
    parser.add_argument("--models", default="mistral-7b,llama-3-8b", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32 = full depth; cpu: 4)")
    parser.add_argument("--num-texts", type=int, default=None, help="default 4096; cpu: 480")
    parser.add_argument("--median", type=int, default=60)
    parser.add_argument("--median-words", type=int, default=24, help="cpu: median word count of a text")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=None, help="default 2 (best of); cpu: 7 (median of)")
    parser.add_argument("--threads", type=int, default=2, help="cpu: torch threads in every process")
    parser.add_argument("--official-python", default=None, help="cpu: an interpreter with llm2vec==0.2.3")
    parser.add_argument("--official-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backend", default=None, help="force an llm2vec_fast attention backend")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=None, help="results file stem (default: encode_<device>)")
    args = parser.parse_args(argv)
    if args.official_worker:
        return official_worker(args.official_worker)
    on_cpu = args.device == "cpu"
    args.layers = args.layers or (4 if on_cpu else 32)
    args.num_texts = args.num_texts or (480 if on_cpu else 4096)
    args.repeats = args.repeats or (7 if on_cpu else 2)
    if on_cpu:
        return bench_cpu(args)
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
