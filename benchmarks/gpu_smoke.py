"""GPU correctness smoke: every backend and feature at a few real shapes, against float64, in about a minute.

    python benchmarks/gpu_smoke.py [--backends cuda triton] [--shard 0/4] [--json smoke.json] [--list]

Each case runs forward and backward (with an lse gradient) through ``flash_attn_func`` /
``flash_attn_varlen_func`` on a backend, with every tensor the Python layer allocates NaN-poisoned first
(torch.empty / empty_like; the CUDA extension allocates in C++, where compute-sanitizer's checks reach),
and compares out, lse, dq, dk and dv with the float64 oracle of the tests (tests/oracle.py, independent of
the backends) on the same device, by relative error under the GUIDE's bounds (fp32 1e-5, fp16 2e-3, bf16
5e-3). The full matrix
lives in the gpu-marked tests; this is the part that fits the quick session. Cases that share a kernel
specialization (same constexpr flags) are grouped so that Triton compiles each once; ``--shard i/n``
runs every n-th group, so that n processes compile in parallel. Exit 1 when any case fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracle import attention_oracle, varlen_oracle  # noqa: E402
from oracle import relative_error as oracle_error  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 5e-3}  # GUIDE section 4, tests/oracle.py's by dtype name
LAYOUTS = ("dense", "right", "left", "holes", "packed", "cross")


@dataclass(frozen=True)
class Case:
    backend: str
    dtype: str = "bf16"
    head_dim: int = 128
    layout: str = "right"  # dense, right/left padding, holes, packed (varlen), cross (Sq != Sk, key mask)
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    deterministic: bool = False
    batch: int = 4
    seqlen: int = 1031
    heads: tuple[int, int] = (8, 2)  # query heads, KV heads (GQA 4:1)

    @property
    def name(self) -> str:
        extras = [f"window{self.window}" if self.window != (-1, -1) else "", "causal" if self.causal else ""]
        extras += [f"softcap{self.softcap:g}" if self.softcap else "", "deterministic" if self.deterministic else ""]
        shape = f"B{self.batch} S{self.seqlen} H{self.heads[0]}/{self.heads[1]} d{self.head_dim}"
        return " ".join([self.backend, self.dtype, self.layout, shape, *filter(None, extras)])

    @property
    def specialization(self) -> tuple:
        """Cases with equal keys run the same compiled kernels (padding patterns share one)."""
        layout = "padded" if self.layout in ("right", "left", "holes") else self.layout
        return (self.backend, self.dtype, self.head_dim, layout, self.causal, self.window, self.softcap > 0)


def plan(backends: list[str]) -> list[Case]:
    """The smoke's cases: every layout and feature on each backend, dtypes and head dims each backend takes."""
    cases = []
    for backend in backends:
        cases += [Case(backend, layout=layout) for layout in LAYOUTS]
        cases += [
            Case(backend, dtype="fp16", head_dim=64, layout="dense"),
            Case(backend, dtype="fp16", head_dim=64, layout="packed"),
            Case(backend, layout="right", causal=True),
            Case(backend, layout="holes", window=(200, 64), softcap=30.0),
            Case(backend, layout="packed", window=(100, 0), softcap=30.0),
            Case(backend, layout="dense", batch=2, seqlen=4096, heads=(16, 4)),
        ]
        if backend == "cuda":
            cases += [
                Case(backend, layout="right", deterministic=True),
                Case(backend, layout="packed", deterministic=True),
            ]
        if backend == "triton":
            cases += [Case(backend, dtype="fp32", layout="right"), Case(backend, head_dim=256, layout="packed")]
    return cases


def shard(cases: list[Case], index: int, count: int) -> list[Case]:
    """Every `count`-th specialization group from `index` on (groups kept whole, in plan order)."""
    groups = list(dict.fromkeys(case.specialization for case in cases))
    mine = set(groups[index::count])
    return [case for case in cases if case.specialization in mine]


def lengths_of(case: Case, generator: torch.Generator) -> list[int]:
    """Real lengths: between a quarter and all of `seqlen`, one fully padded sequence for padded layouts."""
    lengths = torch.randint(case.seqlen // 4, case.seqlen + 1, (case.batch,), generator=generator).tolist()
    if case.layout in ("right", "left", "holes", "cross"):
        lengths[-1] = 0
    if case.layout == "dense":
        lengths = [case.seqlen] * case.batch
    lengths[0] = case.seqlen
    return lengths


def key_mask(case: Case, lengths: list[int], seqlen_k: int, device) -> torch.Tensor | None:
    if case.layout in ("dense", "packed"):
        return None
    positions = torch.arange(seqlen_k, device=device)[None, :]
    real = torch.tensor(lengths, device=device)[:, None] * seqlen_k // case.seqlen
    if case.layout == "left":
        return positions >= seqlen_k - real
    mask = positions < real
    if case.layout == "holes":
        mask &= (positions % 97) > 70  # gaps longer than the span split (64 keys) and shorter ones
        mask[0, :5] = True
    return mask


def attention(case: Case, tensors: dict, backend: str, lengths: list[int], mask):
    """(out, lse) of `case` on `backend` for the (batch, seq, head, dim) or packed tensors given."""
    from llm2vec_fast import flash_attn_func, flash_attn_varlen_func

    options = dict(causal=case.causal, window_size=case.window, softcap=case.softcap, return_lse=True)
    options.update(deterministic=case.deterministic, backend=backend)
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    if case.layout == "packed":
        cu = torch.tensor([0, *lengths], device=q.device).cumsum(0).to(torch.int32)
        return flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), **options)
    return flash_attn_func(q, k, v, mask, **options)


def inputs(case: Case, lengths: list[int], generator: torch.Generator, device) -> dict:
    heads_q, heads_kv = case.heads
    seqlen_k = case.seqlen // 2 + 7 if case.layout == "cross" else case.seqlen
    if case.layout == "packed":
        shapes = dict(q=(sum(lengths), heads_q), k=(sum(lengths), heads_kv), v=(sum(lengths), heads_kv))
    else:
        shapes = dict(q=(case.batch, case.seqlen, heads_q), k=(case.batch, seqlen_k, heads_kv))
        shapes["v"] = shapes["k"]
    tensors = {
        name: torch.randn(*shape, case.head_dim, generator=generator).to(device, DTYPES[case.dtype])
        for name, shape in shapes.items()
    }
    tensors["mask"] = key_mask(case, lengths, seqlen_k, device)
    return tensors


@contextmanager
def poisoned_allocations():
    """torch.empty / empty_like return NaN (floats), True (bools) or -7 (integers) filled memory, so an
    element a kernel forgets to write shows (the same poison as tests/conftest.py's fixture)."""
    original_empty, original_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        if tensor.dtype.is_floating_point:
            return tensor.fill_(float("nan"))
        return tensor.fill_(True if tensor.dtype == torch.bool else -7)

    torch.empty = lambda *a, **k: poison(original_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(original_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = original_empty, original_empty_like


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """tests/oracle.py's relative error over the finite reference entries; inf if `actual` is NaN anywhere
    or differs in where and how it is infinite (an empty row's lse is -inf in both)."""
    actual, expected = actual.double(), expected.double()
    finite = torch.isfinite(expected)
    if torch.isnan(actual).any() or not torch.equal(finite, torch.isfinite(actual)):
        return float("inf")
    if not torch.equal(actual[~finite], expected[~finite]):
        return float("inf")
    return oracle_error(actual[finite], expected[finite])


def oracle(case: Case, tensors: dict, lengths: list[int]):
    """(out, lse) of `case` by tests/oracle.py, the float64 oracle written independently of the backends."""
    options = dict(causal=case.causal, window_size=case.window, softcap=case.softcap)
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    if case.layout == "packed":
        cu = torch.tensor([0, *lengths], device=q.device).cumsum(0).to(torch.int32)
        return varlen_oracle(q, k, v, cu, cu, **options)
    return attention_oracle(q, k, v, tensors["mask"], **options)


def forward_backward(attend, tensors: dict, upstream: dict, dtype=None) -> dict:
    """out, lse and the gradients of (out * dout).sum() + (lse * dlse).sum() (finite lse only) by `attend`."""
    leaves = {name: tensors[name].detach().to(dtype or tensors[name].dtype).requires_grad_() for name in "qkv"}
    out, lse = attend(leaves | {"mask": tensors["mask"]})
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    loss = (out * upstream["dout"].to(out.dtype)).sum() + (finite_lse * upstream["dlse"].to(lse.dtype)).sum()
    grads = torch.autograd.grad(loss, [leaves[name] for name in "qkv"])
    return dict(out=out.detach(), lse=lse.detach(), dq=grads[0], dk=grads[1], dv=grads[2])


def run_case(case: Case, device: str = "cuda") -> dict:
    """Errors of `case` against float64 and whether all are under the bound."""
    generator = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    lengths = lengths_of(case, generator)
    tensors = inputs(case, lengths, generator, device)
    start = time.perf_counter()
    ours_of = lambda leaves: attention(case, leaves, case.backend, lengths, leaves["mask"])  # noqa: E731
    try:
        with poisoned_allocations():
            out, lse = ours_of(tensors)
            upstream = dict(dout=torch.randn(out.shape, generator=generator).to(device))
            upstream["dlse"] = torch.randn(lse.shape, generator=generator).to(device) / 4
            ours = forward_backward(ours_of, tensors, upstream)
        exact = forward_backward(lambda leaves: oracle(case, leaves, lengths), tensors, upstream, torch.float64)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as error:
        return dict(case=case.name, status=f"error: {str(error).splitlines()[0][:160]}", **asdict(case))
    if device == "cuda":
        torch.cuda.synchronize()
    errors = {name: relative_error(ours[name], exact[name]) for name in ours}
    bound = TOLERANCE[case.dtype]
    status = "ok" if all(error < bound for error in errors.values()) else "fail"
    seconds = round(time.perf_counter() - start, 2)
    return dict(case=case.name, status=status, bound=bound, seconds=seconds, errors=errors, **asdict(case))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", choices=["cuda", "triton"], help="default: every one available")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th specialization group from i")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--list", action="store_true", help="print the cases and exit (needs no GPU)")
    args = parser.parse_args(argv)
    try:
        index, count = (int(part) for part in args.shard.split("/"))
    except ValueError:
        parser.error(f"--shard takes i/n (two integers), got {args.shard!r}")
    if not 0 <= index < count:
        parser.error(f"--shard {args.shard}: needs 0 <= i < n")
    args.shard_index, args.shard_count = index, count
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    backends = args.backends or ["cuda", "triton"]
    if args.list:
        for case in shard(plan(backends), args.shard_index, args.shard_count):
            print(case.name)
        return 0
    if not torch.cuda.is_available():
        print("gpu_smoke: needs a CUDA GPU and none is visible; nothing was checked.")
        return 0
    from llm2vec_fast import available_backends

    missing = [backend for backend in backends if backend not in available_backends()]
    results = [dict(case=f"{backend} backend", status="error: not available") for backend in missing]
    for case in shard(plan([b for b in backends if b not in missing]), args.shard_index, args.shard_count):
        results.append(run_case(case))
        row = results[-1]
        worst = max(row.get("errors", {}).values(), default=float("nan"))
        print(f"{row['status']:5} {row['case']:70} worst {worst:.2e} {row.get('seconds', '')} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    failed = [row["case"] for row in results if row["status"] != "ok"]
    print(f"gpu_smoke: {len(results) - len(failed)} of {len(results)} cases pass; failed: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
