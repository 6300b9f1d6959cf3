"""Attention microbenchmark: llm2vec-fast backends vs PyTorch SDPA (each backend forced), FlexAttention,
``torch.nn.attention.varlen_attn`` and flash-attn where installed, side by side in one run.

Two ways to run it:
- the headline tables of issue 10 (``--table dense|padded|mix``, what ``gpu_session.sh quick`` runs, one
  table per call so that each has its own time limit): dense S=2k and 8k; a padded batch with 50%
  padding at S=2k; the embedding mix (64 sequences, log-normal lengths with median ~60 clipped to 512,
  packed for the peers that take packed batches, padded to the longest for those that do not);
- the sweep (no ``--table``): seqlens x head dims x padding fractions.

bf16, GQA 32 query heads over 8 KV heads, head dim 128, non-causal unless told otherwise. Times are
medians of ``triton.testing.do_bench`` (warm-up first). TFLOP/s are *effective*: only real tokens count,
forward ``4 * sum(len_i^2) * Hq * D``, backward 2.5x that (GUIDE section 4). Every timed output is checked
against SDPA-math on float32-upcast inputs (relative error over real rows in the results). A peer that
refuses the inputs is listed with the reason. With ``--static-report`` (kernel_report.py --json), each row
of ours carries the static figures of the tiles it ran, so that the instruction-count proxy can be
calibrated against the measured times.

    python benchmarks/bench_attention.py --table dense --out DIR [--static-report report.json]
    python benchmarks/bench_attention.py [--quick]      # the sweep, writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encode import length_mix  # noqa: E402
from reporting import environment, markdown_table, require_gpu, write_results  # noqa: E402

MODES = ("fwd", "fwd+bwd")
BACKWARD_FACTOR = 2.5  # GUIDE: backward FLOPs are 2.5x the forward's
COLUMNS = ["backend", "mode", "layout", "seqlen", "batch", "padding", "ms", "tflops", "vs_best_peer", "rel_error"]
COLUMNS += ["static", "status"]


@dataclass(frozen=True)
class Problem:
    batch: int
    seqlen: int  # padded length
    heads_q: int
    heads_kv: int
    head_dim: int
    padding: float = 0.0
    causal: bool = False
    explicit_lengths: tuple[int, ...] | None = None  # real lengths, when not derived from `padding`
    layout: str = "padded"  # dense, padded or mix (packed where the runner can)

    def lengths(self) -> list[int]:
        """Real lengths: the explicit ones, or spread evenly so that the mean padding fraction is `padding`."""
        if self.explicit_lengths is not None:
            return list(self.explicit_lengths)
        return [max(1, round(self.seqlen * (1 - 2 * self.padding * (i + 0.5) / self.batch))) for i in range(self.batch)]

    def flops(self, mode: str) -> float:
        pairs = sum(length * (length + 1) / 2 if self.causal else length * length for length in self.lengths())
        forward = 4 * pairs * self.heads_q * self.head_dim
        return forward * (1 + BACKWARD_FACTOR if mode == "fwd+bwd" else 1.0)


def headline_problems(table: str, heads: int = 32, kv_heads: int = 8, head_dim: int = 128) -> list[Problem]:
    """Issue 10's benchmark shapes (16k padded tokens per dense or padded batch)."""
    if table == "dense":
        return [Problem(16384 // s, s, heads, kv_heads, head_dim, layout="dense") for s in (2048, 8192)]
    if table == "padded":
        return [Problem(8, 2048, heads, kv_heads, head_dim, padding=0.5)]
    if table == "mix":
        lengths = length_mix(64, median=60, maximum=512, seed=0)
        return [Problem(64, max(lengths), heads, kv_heads, head_dim, explicit_lengths=tuple(lengths), layout="mix")]
    raise ValueError(f"unknown table {table!r}; choose dense, padded or mix")


def make_inputs(problem: Problem, dtype: torch.dtype) -> dict:
    shape_q = (problem.batch, problem.seqlen, problem.heads_q, problem.head_dim)
    shape_kv = (problem.batch, problem.seqlen, problem.heads_kv, problem.head_dim)
    q = torch.randn(shape_q, device="cuda", dtype=dtype)
    k = torch.randn(shape_kv, device="cuda", dtype=dtype)
    v = torch.randn(shape_kv, device="cuda", dtype=dtype)
    lengths = torch.tensor(problem.lengths(), device="cuda")
    mask = torch.arange(problem.seqlen, device="cuda")[None, :] < lengths[:, None]
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    flat = mask.flatten()
    packed = [t.flatten(0, 1)[flat].detach().clone() for t in (q, k, v)]
    return dict(
        q=q,
        k=k,
        v=v,
        mask=mask,
        has_padding=not bool(mask.all()),
        cu_seqlens=cu_seqlens,
        packed=packed,
        max_len=int(lengths.max()),
        dout=torch.randn_like(q),
    )


def unpack(x: dict, out: torch.Tensor) -> torch.Tensor:
    """A packed (tokens, heads, dim) output scattered back into the padded layout (zeros at padding)."""
    padded = x["q"].new_zeros(x["q"].shape)
    padded.flatten(0, 1)[x["mask"].flatten()] = out
    return padded


def ours_padded(backend):
    from llm2vec_fast import flash_attn_func

    def run(x, causal):
        mask = x["mask"] if x["has_padding"] else None
        return flash_attn_func(x["q"], x["k"], x["v"], mask, causal=causal, backend=backend)

    return run


def ours_varlen(backend):
    from llm2vec_fast import flash_attn_varlen_func

    def run(x, causal):
        q, k, v = x["packed"]
        cu, longest = x["cu_seqlens"], x["max_len"]
        return unpack(x, flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=causal, backend=backend))

    return run


def sdpa(kernel_name):
    """SDPA with one backend forced; with a boolean key-padding mask whenever the batch has padding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[kernel_name]

    def run(x, causal):
        q, k, v = (t.transpose(1, 2) for t in (x["q"], x["k"], x["v"]))
        attn_mask = x["mask"][:, None, None, :] if x["has_padding"] else None
        if attn_mask is not None and causal:
            seqlen = q.shape[2]
            attn_mask = attn_mask & torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
        with sdpa_kernel(kernel):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None, enable_gqa=True
            )
        return out.transpose(1, 2)

    return run


def flex(packed: bool):
    """FlexAttention, compiled once per shape: a padding mask on the padded batch, or a document mask
    over the packed tokens."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    cache = {}

    def block_mask(x, causal):
        key = (id(x["mask"]), causal, packed)
        if key not in cache:
            if packed:
                sequences = torch.arange(len(x["cu_seqlens"]) - 1, device="cuda")
                document = torch.repeat_interleave(sequences, x["mask"].sum(1))

                def keep(b, h, q_idx, kv_idx):
                    same = document[q_idx] == document[kv_idx]
                    return same & (kv_idx <= q_idx) if causal else same

                tokens = len(document)
                cache[key] = create_block_mask(keep, 1, None, tokens, tokens, device="cuda")
            else:
                lengths = x["mask"].sum(1)

                def keep(b, h, q_idx, kv_idx):
                    real = (q_idx < lengths[b]) & (kv_idx < lengths[b])
                    return real & (kv_idx <= q_idx) if causal else real

                batch, seqlen = x["mask"].shape
                cache[key] = create_block_mask(keep, batch, None, seqlen, seqlen, device="cuda")
        return cache[key]

    def run(x, causal):
        mask = block_mask(x, causal)
        if packed:
            q, k, v = (t[None].transpose(1, 2) for t in x["packed"])
            return unpack(x, compiled(q, k, v, block_mask=mask, enable_gqa=True).transpose(1, 2)[0])
        q, k, v = (t.transpose(1, 2) for t in (x["q"], x["k"], x["v"]))
        return compiled(q, k, v, block_mask=mask, enable_gqa=True).transpose(1, 2)

    return run


def varlen_attn_runner():
    """torch.nn.attention.varlen_attn (torch >= 2.10) on the packed batch; K/V expanded where the installed
    version has no enable_gqa."""
    from torch.nn.attention.varlen import varlen_attn

    native_gqa = "enable_gqa" in inspect.signature(varlen_attn).parameters

    def run(x, causal):
        q, k, v = x["packed"]
        if not native_gqa:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        options = dict(enable_gqa=True) if native_gqa else {}
        window = (-1, 0) if causal else (-1, -1)
        cu, longest = x["cu_seqlens"], x["max_len"]
        return unpack(x, varlen_attn(q, k, v, cu, cu, longest, longest, window_size=window, **options))

    return run, "varlen_attn" if native_gqa else "varlen_attn (kv expanded)"


def flash_attn_package():
    from flash_attn import flash_attn_varlen_func as fa_varlen

    def run(x, causal):
        q, k, v = x["packed"]
        cu, longest = x["cu_seqlens"], x["max_len"]
        return unpack(x, fa_varlen(q, k, v, cu, cu, longest, longest, causal=causal))

    return run


def candidates(layout: str = "padded", flex_peers: bool = True) -> dict:
    """Runners by name for a table's layout: ours (mask and varlen forms where they differ), SDPA with each
    backend forced, FlexAttention, varlen_attn and flash-attn where importable."""
    from llm2vec_fast import available_backends

    runners = {}
    for backend in ("cuda", "triton"):
        if backend in available_backends():
            if layout != "mix":
                runners[f"ours-{backend}" if layout == "dense" else f"ours-{backend} mask"] = ours_padded(backend)
            if layout != "dense":
                runners[f"ours-{backend} varlen"] = ours_varlen(backend)
    for kernel_name in ("cudnn", "flash", "efficient", "math"):
        runners[f"sdpa-{kernel_name}" + (" mask" if layout != "dense" else "")] = sdpa(kernel_name)
    if flex_peers:
        try:
            runners["flex" + (" document mask" if layout == "mix" else "")] = flex(packed=layout == "mix")
        except ImportError:
            pass
    if layout != "dense":
        try:
            run, name = varlen_attn_runner()
            runners[name] = run
        except ImportError:
            pass
    try:
        runners["flash-attn varlen"] = flash_attn_package()
    except ImportError:
        pass
    return runners


def relative_error(out: torch.Tensor, x: dict, causal: bool) -> float:
    """Against SDPA-math on float32 inputs, over real query rows only (the reference is cached per batch)."""
    key = ("reference", causal)
    if key not in x:
        upcast = {name: value.float() if name in ("q", "k", "v") else value for name, value in x.items()}
        with torch.no_grad():
            x[key] = sdpa("math")(upcast, causal)
    ref, rows = x[key], x["mask"]
    return ((out[rows].float() - ref[rows]).norm() / ref[rows].norm()).item()


def measure(run, x: dict, problem: Problem, mode: str, warmup: int = 25, rep: int = 100) -> dict:
    from triton.testing import do_bench

    leaves = [x[name].requires_grad_(mode == "fwd+bwd") for name in ("q", "k", "v")]
    for packed in x["packed"]:
        packed.requires_grad_(mode == "fwd+bwd")
    try:
        out = run(x, problem.causal)
        error = relative_error(out.detach(), x, problem.causal)
        if mode == "fwd":

            def step():
                with torch.no_grad():
                    run(x, problem.causal)
        else:
            inputs = leaves + x["packed"]

            def step():
                result = run(x, problem.causal)
                torch.autograd.grad(result, [t for t in inputs if t.requires_grad], x["dout"], allow_unused=True)

        ms = do_bench(step, warmup=warmup, rep=rep, return_mode="median")
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as error_message:  # refused these inputs
        return {"status": f"unsupported: {str(error_message).splitlines()[0][:120]}"}
    finally:
        torch.cuda.synchronize()
    return {"status": "ok", "ms": ms, "tflops": problem.flops(mode) / ms / 1e9, "rel_error": error}


def compare_with_peers(rows: list[dict]) -> None:
    """Each measured row's speed relative to the fastest peer (not ours) of the same problem and mode."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["layout"], row["seqlen"], row["batch"], row["head_dim"], row["mode"]), []).append(row)
    for group in groups.values():
        peers = [row["tflops"] for row in group if row["status"] == "ok" and not row["backend"].startswith("ours")]
        for row in group:
            if row["status"] == "ok" and peers:
                row["vs_best_peer"] = row["tflops"] / max(peers)


# Catalog layout of a benchmark row of ours: a dense batch has no mask, the mix and varlen rows are packed.
def static_layout(row: dict) -> str:
    if row["backend"].endswith("varlen") or row["layout"] == "mix":
        return "packed"
    return "dense" if row["layout"] == "dense" else "padded"


def static_figures(row: dict, report: list[dict], tiles: dict[str, tuple]) -> str:
    """The static report's figures for the kernels a row of ours ran: for Triton the tiles the autotuner
    chose (`tiles`: catalog key -> (BLOCK_M, BLOCK_N, warps, stages)), for CUDA the csrc kernels of d128
    bf16 on sm_90a. Empty where nothing matches."""
    wanted = ["fwd"] + (["bwd", "dkdv", "dq"] if row["mode"] == "fwd+bwd" else [])
    parts = []
    if "triton" in row["backend"]:
        for kernel in wanted:
            for static in report:
                spec = (static.get("block_m"), static.get("block_n"), static.get("num_warps"), static.get("num_stages"))
                if (
                    static.get("source") == "triton"
                    and static["kernel"] == kernel
                    and static["arch"] == "sm_90a"
                    and static.get("input_class") == "half"
                    and static.get("variant") == static_layout(row)
                    and spec == tiles.get(kernel)
                ):
                    parts.append(_figure(kernel, static))
    elif "cuda" in row["backend"]:
        names = {
            "fwd": ("fwd_kernel", "fwd_sm90_kernel"),
            "dkdv": ("bwd_dkdv_kernel", "bwd_sm90_kernel"),
            "dq": ("bwd_dq_kernel",),
        }
        for kernel in (kernel for kernel in wanted if kernel in names):
            for static in report:
                if (
                    static.get("source") == "cuda"
                    and static["arch"] == "sm_90a"
                    and "d128_bf16" in static.get("file", "")
                    and static.get("kernel", "").startswith(names[kernel])
                    and not static.get("kernel", "").endswith(", false>")  # the deterministic dK/dV: not run here
                ):
                    parts.append(_figure(kernel, static))
    return "; ".join(parts)


def _figure(kernel: str, static: dict) -> str:
    per_block = f"{static['per_block']:.0f}" if static.get("per_block") else "-"
    tile = f"{static['block_m']}x{static['block_n']}w{static['num_warps']}"
    return f"{kernel} {tile}: {per_block} instr/64x64, {static['registers']} regs"


def chosen_tiles() -> dict[str, tuple]:
    """The tiles the Triton autotuner last chose, per catalog kernel (those that have run)."""
    from llm2vec_fast.kernels.catalog import KERNELS

    tiles = {}
    for label, kernel in KERNELS.items():
        config = getattr(kernel.function, "best_config", None)
        if config is not None and "BLOCK_M" in config.kwargs:
            tiles[label] = (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages)
    return tiles


def run_problems(problems: list[Problem], modes, runners_for, report, warmup: int, rep: int) -> list[dict]:
    rows = []
    for problem in problems:
        torch.manual_seed(0)
        x = make_inputs(problem, torch.bfloat16)
        runners = runners_for(problem)
        for mode in modes:
            for name, run in runners.items():
                row = dict(
                    backend=name,
                    mode=mode,
                    layout=problem.layout,
                    seqlen=problem.seqlen,
                    batch=problem.batch,
                    head_dim=problem.head_dim,
                    heads=f"{problem.heads_q}/{problem.heads_kv}",
                    padding=round(1 - sum(problem.lengths()) / (problem.batch * problem.seqlen), 3),
                    causal=problem.causal,
                    flops=problem.flops(mode),
                )
                row.update(measure(run, x, problem, mode, warmup, rep))
                if name.startswith("ours") and row["status"] == "ok":
                    row["static"] = static_figures(row, report, chosen_tiles())
                rows.append(row)
                shown = f"{row['ms']:.3f} ms {row['tflops']:.0f} TFLOP/s" if row["status"] == "ok" else row["status"]
                print(f"{problem.layout} S{problem.seqlen} B{problem.batch} {mode:8s} {name:26s} {shown}", flush=True)
        del x
        torch.cuda.empty_cache()
    compare_with_peers(rows)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", choices=["dense", "padded", "mix"], help="one headline table (default: sweep)")
    parser.add_argument("--seqlens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--paddings", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--tokens", type=int, default=16384, help="padded tokens per batch (batch = tokens // seqlen)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--backends", nargs="*", help="subset of runner names (default: all available)")
    parser.add_argument("--no-flex", action="store_true", help="leave FlexAttention out (its compile takes ~20 s)")
    parser.add_argument("--quick", action="store_true", help="sweep: seqlens 512 2048, head dim 128, paddings 0, 0.5")
    parser.add_argument("--rep", type=int, default=100, help="do_bench's timed milliseconds per measurement")
    parser.add_argument("--static-report", type=Path, help="kernel_report.py --json output to attach to our rows")
    parser.add_argument("--out", type=Path, help="results directory (default benchmarks/results/)")
    parser.add_argument("--name", default=None, help="results file stem (default: attention_<table or device>)")
    args = parser.parse_args(argv)
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    if args.static_report is not None and not args.static_report.is_file():
        parser.error(f"--static-report {args.static_report}: no such file")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not require_gpu("bench_attention"):
        return 0
    report = json.loads(args.static_report.read_text())["rows"] if args.static_report else []
    env = environment()

    def runners_for(problem: Problem) -> dict:
        runners = candidates(problem.layout, flex_peers=not args.no_flex)
        return {name: run for name, run in runners.items() if not args.backends or name in args.backends}

    if args.table:
        problems = headline_problems(args.table, args.heads, args.kv_heads, args.head_dims[-1])
    else:
        if args.quick:
            args.seqlens, args.head_dims, args.paddings = [512, 2048], [128], [0.0, 0.5]
        problems = [
            Problem(max(1, args.tokens // s), s, args.heads, args.kv_heads, d, p, args.causal)
            for d in args.head_dims
            for s in args.seqlens
            for p in args.paddings
        ]
    rows = run_problems(problems, args.modes, runners_for, report, warmup=25, rep=args.rep)
    name = args.name or "attention_" + (args.table or env["device"].replace(" ", "_").lower())
    stem = write_results(name, env, rows, markdown_table(rows, COLUMNS), args.out)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
