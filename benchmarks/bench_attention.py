"""Attention microbenchmark: llm2vec-fast backends vs PyTorch SDPA (each backend forced), FlexAttention
and flash-attn where installed, on padded batches.

Batches have a fixed token budget (batch = tokens // seqlen), right padding whose mean fraction is
the requested one, GQA (32 query heads, 8 KV heads by default), bf16. Times are medians of
``triton.testing.do_bench``. TFLOP/s are *effective*: only real tokens are counted,
forward ``4 * sum(len_i^2) * Hq * D``, backward 2.5x that (non-causal). Every timed output is
checked against SDPA-math on float32-upcast inputs; the relative error is in the results.

    python benchmarks/bench_attention.py                 # full sweep, writes benchmarks/results/
    python benchmarks/bench_attention.py --quick         # a few shapes
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reporting import environment, markdown_table, require_gpu, write_results  # noqa: E402

from llm2vec_fast import available_backends, flash_attn_func, flash_attn_varlen_func  # noqa: E402


@dataclass(frozen=True)
class Problem:
    batch: int
    seqlen: int
    heads_q: int
    heads_kv: int
    head_dim: int
    padding: float
    causal: bool

    def lengths(self) -> list[int]:
        """Real lengths, spread evenly so that the mean padding fraction is `padding`."""
        return [max(1, round(self.seqlen * (1 - 2 * self.padding * (i + 0.5) / self.batch))) for i in range(self.batch)]

    def flops(self, mode: str) -> float:
        pairs = sum(length * (length + 1) / 2 if self.causal else length * length for length in self.lengths())
        forward = 4 * pairs * self.heads_q * self.head_dim
        return forward * (3.5 if mode == "fwd+bwd" else 1.0)


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
    packed = [t.flatten(0, 1)[flat] for t in (q, k, v)]
    return dict(
        q=q,
        k=k,
        v=v,
        mask=mask,
        cu_seqlens=cu_seqlens,
        packed=packed,
        max_len=int(lengths.max()),
        dout=torch.randn_like(q),
    )


def ours_padded(backend):
    def run(x, causal):
        return flash_attn_func(x["q"], x["k"], x["v"], x["mask"], causal=causal, backend=backend)

    return run


def ours_varlen(backend):
    def run(x, causal):
        q, k, v = x["packed"]
        out = flash_attn_varlen_func(
            q, k, v, x["cu_seqlens"], x["cu_seqlens"], x["max_len"], x["max_len"], causal=causal, backend=backend
        )
        padded = x["q"].new_zeros(x["q"].shape)
        padded.flatten(0, 1)[x["mask"].flatten()] = out
        return padded

    return run


def sdpa(kernel_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[kernel_name]

    def run(x, causal):
        q, k, v = (t.transpose(1, 2) for t in (x["q"], x["k"], x["v"]))
        has_padding = not bool(x["mask"].all())
        attn_mask = x["mask"][:, None, None, :] if has_padding else None
        if attn_mask is not None and causal:
            seqlen = q.shape[2]
            attn_mask = attn_mask & torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
        with sdpa_kernel(kernel):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=causal and attn_mask is None, enable_gqa=True
            )
        return out.transpose(1, 2)

    return run


def flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    cache = {}

    def run(x, causal):
        key = (id(x["mask"]), causal)
        if key not in cache:
            lengths = x["mask"].sum(1)

            def keep(b, h, q_idx, kv_idx):
                real = (q_idx < lengths[b]) & (kv_idx < lengths[b])
                return real & (kv_idx <= q_idx) if causal else real

            batch, seqlen = x["mask"].shape
            cache[key] = create_block_mask(keep, batch, None, seqlen, seqlen, device="cuda")
        q, k, v = (t.transpose(1, 2) for t in (x["q"], x["k"], x["v"]))
        return compiled(q, k, v, block_mask=cache[key], enable_gqa=True).transpose(1, 2)

    return run


def flash_attn_package():
    from flash_attn import flash_attn_varlen_func as fa_varlen

    def run(x, causal):
        q, k, v = x["packed"]
        out = fa_varlen(q, k, v, x["cu_seqlens"], x["cu_seqlens"], x["max_len"], x["max_len"], causal=causal)
        padded = x["q"].new_zeros(x["q"].shape)
        padded.flatten(0, 1)[x["mask"].flatten()] = out
        return padded

    return run


def candidates() -> dict:
    runners = {}
    for backend in ("cuda", "triton"):
        if backend in available_backends():
            runners[f"ours-{backend} mask"] = ours_padded(backend)
            runners[f"ours-{backend} varlen"] = ours_varlen(backend)
    for kernel_name in ("flash", "efficient", "cudnn", "math"):
        runners[f"sdpa-{kernel_name}"] = sdpa(kernel_name)
    try:
        runners["flex"] = flex()
    except ImportError:
        pass
    try:
        runners["flash-attn varlen"] = flash_attn_package()
    except ImportError:
        pass
    return runners


def relative_error(out: torch.Tensor, x: dict, causal: bool) -> float:
    """Against SDPA-math on float32 inputs, over real query rows only."""
    upcast = {key: value.float() if key in ("q", "k", "v") else value for key, value in x.items()}
    ref = sdpa("math")(upcast, causal)
    rows = x["mask"]
    return ((out[rows].float() - ref[rows]).norm() / ref[rows].norm()).item()


def measure(run, x: dict, problem: Problem, mode: str) -> dict:
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

        ms = do_bench(step, warmup=25, rep=100, return_mode="median")
    except (RuntimeError, ValueError, NotImplementedError) as error_message:  # backend refused these inputs
        return {"status": f"unsupported: {str(error_message).splitlines()[0][:120]}"}
    finally:
        torch.cuda.synchronize()
    return {"status": "ok", "ms": ms, "tflops": problem.flops(mode) / ms / 1e9, "rel_error": error}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--paddings", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--tokens", type=int, default=16384, help="padded tokens per batch (batch = tokens // seqlen)")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--backends", nargs="*", help="subset of runner names (default: all available)")
    parser.add_argument("--quick", action="store_true", help="seqlens 512 2048, head dim 128, paddings 0 and 0.5")
    parser.add_argument("--name", default=None, help="results file stem (default: attention_<device>)")
    args = parser.parse_args()
    if not require_gpu("bench_attention"):
        return 0
    if args.quick:
        args.seqlens, args.head_dims, args.paddings = [512, 2048], [128], [0.0, 0.5]
    env = environment()
    runners = candidates()
    if args.backends:
        runners = {name: run for name, run in runners.items() if name in args.backends}
    rows = []
    for head_dim in args.head_dims:
        for seqlen in args.seqlens:
            for padding in args.paddings:
                problem = Problem(
                    max(1, args.tokens // seqlen), seqlen, args.heads, args.kv_heads, head_dim, padding, args.causal
                )
                torch.manual_seed(0)
                x = make_inputs(problem, torch.bfloat16)
                for mode in args.modes:
                    for name, run in runners.items():
                        row = dict(
                            backend=name,
                            mode=mode,
                            seqlen=seqlen,
                            batch=problem.batch,
                            head_dim=head_dim,
                            heads=f"{args.heads}/{args.kv_heads}",
                            padding=padding,
                            causal=args.causal,
                        )
                        row.update(measure(run, x, problem, mode))
                        rows.append(row)
                        shown = (
                            f"{row['ms']:.3f} ms {row['tflops']:.0f} TFLOP/s"
                            if row["status"] == "ok"
                            else row["status"]
                        )
                        print(f"d{head_dim} S{seqlen} pad{padding:.2f} {mode:8s} {name:20s} {shown}", flush=True)
                del x
                torch.cuda.empty_cache()
    name = args.name or "attention_" + env["device"].replace(" ", "_").lower()
    columns = ["backend", "mode", "head_dim", "seqlen", "batch", "padding", "ms", "tflops", "rel_error", "status"]
    stem = write_results(name, env, rows, markdown_table(rows, columns))
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
