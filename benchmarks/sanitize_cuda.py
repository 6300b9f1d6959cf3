"""Every kernel variant of the CUDA backend on small shapes, for compute-sanitizer.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 99 \
        python benchmarks/sanitize_cuda.py      # also --tool racecheck, --tool synccheck

Covers both dtypes and both head dims, forward and backward (atomic dQ and deterministic paths),
the key-mask packer, padded batches with fully padded rows and tiles, cross attention, varlen with
empty sequences, causal, sliding windows, soft caps and an lse gradient. Shapes are small (racecheck
is slow) but span several tiles and partial last tiles. Without caching, each tensor is its own
allocation, so memcheck sees out-of-bounds accesses exactly. tests/test_cuda_backend.py runs it.
"""

from __future__ import annotations

import torch

from llm2vec_fast import flash_attn_func, flash_attn_varlen_func


def padded(batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, dtype, masked, **options):
    q = torch.randn(batch, seqlen_q, heads_q, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    mask = None
    if masked:
        mask = torch.ones(batch, seqlen_k, dtype=torch.bool, device="cuda")
        mask[0, : seqlen_k // 2] = False  # left padding over whole tiles
        mask[-1] = False  # a fully padded sequence
        if batch > 2:
            mask[1, 3::5] = False  # holes
    out, lse = flash_attn_func(q, k, v, mask, return_lse=True, backend="cuda", **options)
    return (q, k, v), out, lse


def varlen(lengths, heads_q, heads_kv, head_dim, dtype, **options):
    total = sum(lengths)
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    q = torch.randn(total, heads_q, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(total, heads_kv, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(total, heads_kv, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    out, lse = flash_attn_varlen_func(
        q, k, v, cu, cu, max(lengths), max(lengths), return_lse=True, backend="cuda", **options
    )
    return (q, k, v), out, lse


def backward(leaves, out, lse, with_lse: bool) -> None:
    outputs, grads = [out], [torch.randn_like(out)]
    if with_lse:
        outputs.append(lse)
        grads.append(torch.randn_like(lse))
    torch.autograd.grad(outputs, leaves, grads)


def main() -> None:
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for head_dim in (64, 128):
            for deterministic in (False, True):
                runs = [
                    padded(3, 150, 150, 4, 2, head_dim, dtype, masked=True, deterministic=deterministic),
                    padded(2, 70, 200, 2, 1, head_dim, dtype, masked=True, causal=True, deterministic=deterministic),
                    padded(
                        2,
                        130,
                        130,
                        2,
                        2,
                        head_dim,
                        dtype,
                        masked=False,
                        window_size=(40, 8),
                        softcap=5.0,
                        deterministic=deterministic,
                    ),
                    varlen([1, 0, 129, 70], 4, 1, head_dim, dtype, causal=True, deterministic=deterministic),
                ]
                for index, (leaves, out, lse) in enumerate(runs):
                    backward(leaves, out, lse, with_lse=index == 0)
    torch.cuda.synchronize()
    print("all kernel variants ran")


if __name__ == "__main__":
    main()
