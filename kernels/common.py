"""Pieces shared by the forward and backward attention kernels and their launchers.

Masking model (mirrors ``llm2vec_fast.backends.reference``): query row ``i`` of a sequence with
``q_len`` queries and ``k_len`` keys sits at key position ``i + k_len - q_len`` and may see keys
``j`` with ``pos - window_left <= j <= pos + window_right`` (causal = right window 0), restricted
to real keys. A key-padding mask is turned into *spans*: intervals of keys that start and end on
a real key and contain no run of SPLIT_GAP or more padding keys (one span for left or right
padding). Kernels loop over spans and over tiles inside them, so long stretches of padding are
never visited; the shorter holes inside a span are masked with the per-key mask bits.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..tensor_cache import TensorCache

LOG2E = 1.4426950408889634
SPLIT_GAP = 64  # padding gaps at least this long are skipped; shorter ones are masked
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


TileSpec = tuple[int, int, int, int]  # BLOCK_M, BLOCK_N, num_warps, num_stages
INTERPRETER_TILES: TileSpec = (32, 32, 4, 1)


def input_class(dtype: torch.dtype, block_d: int) -> str:
    """Inputs that want different tiles: 16-bit up to head dim 128, 16-bit wider, and fp32
    (exact fp32 dots run on CUDA cores and need far more registers per tile)."""
    if dtype == torch.float32:
        return "fp32"
    return "half_wide" if block_d > 128 else "half"


def autotuned(table: dict[str, list[TileSpec]]) -> dict:
    """``triton.autotune`` arguments (configs and a prune picking the inputs' class) from a table
    class -> tile specs. Every spec in the tables compiles for sm_80 and sm_90a without register
    spills (tests/test_triton_compile.py checks it). The interpreter gets one small fixed tile."""
    specs = [INTERPRETER_TILES] if INTERPRETING else list(dict.fromkeys(s for row in table.values() for s in row))
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in specs]

    def prune(configs, named_args, **kwargs):
        if INTERPRETING:
            return configs
        allowed = set(table[input_class(named_args["Q"].dtype, kwargs["BLOCK_D"])])
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]

    return dict(configs=configs, prune_configs_by={"early_config_prune": prune})


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's matmul precision setting ("highest" = exact fp32, else tf32)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


@dataclass(frozen=True)
class LaunchShape:
    """What a launch needs to know about the batch layout, derived once per call."""

    batch: int
    seqlen_q: int  # padded length, or max_seqlen_q for varlen
    seqlen_k: int
    is_varlen: bool
    key_mask: torch.Tensor | None  # uint8 (B, Sk), contiguous, 1 = real key
    key_spans: torch.Tensor | None  # int32 (B, R, 2): [start, end) of each span of keys
    num_spans: torch.Tensor | None  # int32 (B,)
    mask_queries: bool  # padded self-attention: the key mask also marks query rows
    window_left: int
    window_right: int

    @property
    def stride_mask(self) -> int:
        return 0 if self.key_mask is None else self.key_mask.stride(0)

    @property
    def stride_spans(self) -> int:
        return 0 if self.key_spans is None else self.key_spans.stride(0)


_spans_of_masks = TensorCache()  # every layer of a forward (and its backward) passes the same mask


def key_spans(key_mask: torch.Tensor, split_gap: int = SPLIT_GAP) -> tuple[torch.Tensor, torch.Tensor]:
    """Spans of keys per row: (B, R, 2) int32 [start, end) pairs and (B,) span counts.

    A span starts at a real key preceded by at least `split_gap` padding keys (or none before it)
    and ends at a real key followed likewise. Computed with scans and scatters, never nonzero(),
    so it does not wait on the device; slot R of the scratch buffer absorbs non-events.
    """
    batch, seqlen = key_mask.shape
    max_spans = seqlen // (split_gap + 1) + 1
    positions = torch.arange(seqlen, device=key_mask.device, dtype=torch.int32).expand(batch, seqlen)
    far = seqlen + split_gap + 1
    last_real = torch.where(key_mask, positions, -far).cummax(dim=1).values
    next_real = torch.where(key_mask, positions, 2 * far).flip(1).cummin(dim=1).values.flip(1)
    prev_real = torch.nn.functional.pad(last_real[:, :-1], (1, 0), value=-far)
    following_real = torch.nn.functional.pad(next_real[:, 1:], (0, 1), value=2 * far)
    starts = key_mask & (positions - prev_real > split_gap)
    ends = key_mask & (following_real - positions > split_gap)
    spans = torch.zeros(batch, 2, max_spans + 1, dtype=torch.int32, device=key_mask.device)
    for side, events, value in ((0, starts, positions), (1, ends, positions + 1)):
        slot = torch.where(events, events.cumsum(dim=1) - 1, max_spans)
        spans[:, side].scatter_(1, slot, value)
    return spans[:, :, :max_spans].transpose(1, 2).contiguous(), starts.sum(dim=1, dtype=torch.int32)


def unit_last_stride(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` with the unit last stride the kernels read head-dim rows with, copying only what needs it:
    dims of stride 0 (broadcast) stay so, so the expanded gradient of ``out.sum()`` (every stride 0)
    costs one head-dim row, not a full write (its other strides are read as they are)."""
    if tensor.stride(-1) == 1:
        return tensor
    kept = tuple(slice(0, 1) if stride == 0 else slice(None) for stride in tensor.stride()[:-1])
    return tensor[kept].contiguous().expand(tensor.shape)


def kernel_mask(key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mask bytes, key spans, span counts) of a bool (B, Sk) mask, laid out as the kernels index them
    (contiguous rows: a view such as ``mask.t()`` or ``mask[:, ::2]`` is copied, B * Sk bytes)."""
    return (key_mask.contiguous().view(torch.uint8), *key_spans(key_mask))


def launch_shape(
    q: torch.Tensor,
    k: torch.Tensor,
    key_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    window_size: tuple[int, int],
) -> LaunchShape:
    left, right = window_size
    if causal:
        right = 0
    if cu_seqlens_q is not None:
        return LaunchShape(cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k, True, None, None, None, False,
                           left, right)
    batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    mask_bytes = spans = num_spans = None
    if key_mask is not None:
        mask_bytes, spans, num_spans = _spans_of_masks.get(key_mask, None, lambda: kernel_mask(key_mask))
    mask_queries = key_mask is not None and seqlen_q == seqlen_k
    return LaunchShape(batch, seqlen_q, seqlen_k, False, mask_bytes, spans, num_spans, mask_queries, left, right)


def mask_args(shape: LaunchShape, cu_seqlens_q, cu_seqlens_k, placeholder: torch.Tensor) -> tuple:
    """(KeyMask, KeySpans, NumSpans, CuSeqlensQ, CuSeqlensK) kernel arguments, contiguous (the kernels
    index them with unit strides; a view of offsets is copied); absent ones point at a placeholder that
    the kernel never dereferences (its constexpr flags compile those loads away)."""
    return tuple(placeholder if t is None else t.contiguous() for t in
                 (shape.key_mask, shape.key_spans, shape.num_spans, cu_seqlens_q, cu_seqlens_k))


def seqlen_bucket(seqlen: int) -> int:
    """Autotuning key: sequences within a factor of two share tuned block sizes."""
    return 1 << max(4, math.ceil(math.log2(max(seqlen, 1))))


@triton.jit
def mma(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """tl.dot in fp32 accumulation; the interpreter gets fp32 operands (its bf16 dot is broken)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def to_bf16_rounded(x):
    """fp32 -> bf16 rounded to nearest even in integer arithmetic, as a GPU's cvt.rn does (Triton's
    interpreter truncates, and mangles subnormals). NaN stays NaN; overflow rounds to inf."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    rounded = tl.where(x != x, bits | 0x400000, rounded)
    return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def convert(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype); UPCAST (on only when interpreting) rounds bf16 to nearest even as the GPU does."""
    if UPCAST and dtype == tl.bfloat16:
        return to_bf16_rounded(x.to(tl.float32))
    return x.to(dtype)


@triton.jit
def tanh(x):
    """tanh via exp2, saturating cleanly to +-1 for large |x| (no libdevice needed)."""
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def sequence_bounds(CuSeqlensQ, CuSeqlensK, batch, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(q_start, q_len, k_start, k_len) of sequence `batch` in its tensors' token axis."""
    if IS_VARLEN:
        q_start = tl.load(CuSeqlensQ + batch)
        q_len = tl.load(CuSeqlensQ + batch + 1) - q_start
        k_start = tl.load(CuSeqlensK + batch)
        k_len = tl.load(CuSeqlensK + batch + 1) - k_start
    else:
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k
    return q_start, q_len, k_start, k_len


@triton.jit
def span_count(NumSpans, batch, HAS_MASK: tl.constexpr):
    """Spans of keys in this sequence: one implicit span [0, k_len) without a mask."""
    if HAS_MASK:
        count = tl.load(NumSpans + batch)
    else:
        count = 1
    return count


@triton.jit
def span_bounds(KeySpans, span, seq_len, HAS_MASK: tl.constexpr):
    """[start, end) of span `span` (KeySpans already offset to this sequence's row)."""
    if HAS_MASK:
        start = tl.load(KeySpans + 2 * span)
        end = tl.load(KeySpans + 2 * span + 1)
    else:
        start = 0
        end = seq_len
    return start, end


@triton.jit
def real_keys(KeyMask, offs_n, in_bounds, CHECK_BOUNDS: tl.constexpr):
    """Mask bits (as bool) of keys offs_n; KeyMask already offset to this sequence's row."""
    if CHECK_BOUNDS:
        bits = tl.load(KeyMask + offs_n, mask=in_bounds, other=0)
    else:
        bits = tl.load(KeyMask + offs_n)
    return bits != 0


@triton.jit
def query_rows(KeyMask, NumSpans, batch, offs_m, q_len, HAS_MASK: tl.constexpr, MASK_QUERIES: tl.constexpr):
    """(rows_in, rows_real, num_spans) of a query block: rows inside the sequence, rows that are real
    tokens (padded self-attention masks query rows too), and how many key spans the block walks
    (none when no row is real). KeyMask is already offset to this sequence's row."""
    rows_in = offs_m < q_len
    rows_real = rows_in
    num_spans = span_count(NumSpans, batch, HAS_MASK)
    if MASK_QUERIES:
        rows_real = real_keys(KeyMask, offs_m, rows_in, True)
        if tl.max(rows_real.to(tl.int32), axis=0) == 0:
            num_spans = 0
    return rows_in, rows_real, num_spans


@triton.jit
def clip_to_window(lo, hi, row_first, row_last, offset, window_left, window_right,
                   WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """Keys [lo, hi) of a span that some row of the block sees, and [full_lo, full_hi): those all rows see.
    Either range may come out empty with its end before its start."""
    full_lo = lo
    full_hi = hi
    if WINDOW_RIGHT:
        hi = tl.minimum(hi, row_last + offset + window_right + 1)
        full_hi = tl.minimum(hi, row_first + offset + window_right + 1)
    if WINDOW_LEFT:
        lo = tl.maximum(lo, row_first + offset - window_left)
        full_lo = tl.maximum(lo, row_last + offset - window_left)
    return lo, hi, full_lo, full_hi


@triton.jit
def window_allowed(offs_m, offs_n, offset, window_left, window_right,
                   WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: key offs_n inside the window of query offs_m (aligned by `offset`)."""
    pos = offs_m[:, None] + offset
    allowed = offs_n[None, :] >= 0
    if WINDOW_RIGHT:
        allowed = allowed & (offs_n[None, :] <= pos + window_right)
    if WINDOW_LEFT:
        allowed = allowed & (offs_n[None, :] >= pos - window_left)
    return allowed


@triton.jit
def capped_scores(qk, qk_scale, softcap_scale, SOFTCAP: tl.constexpr):
    """Scores in log2 units; with SOFTCAP also tanh(qk * scale / softcap) for the backward."""
    if SOFTCAP:
        t = tanh(qk * qk_scale)
        return t * softcap_scale, t
    return qk * qk_scale, qk


@triton.jit
def tile_mask(rows_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Mask of a (rows, BLOCK_D) tile; the head-dim part exists only when BLOCK_D pads HEAD_DIM."""
    mask = rows_ok[:, None]
    if BLOCK_D != HEAD_DIM:
        mask = mask & (offs_d < HEAD_DIM)[None, :]
    return mask


@triton.jit
def load_tile(ptrs, rows_ok, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile with only the masks it needs (none for full, unpadded tiles)."""
    if CHECK_ROWS:
        tile = tl.load(ptrs, mask=tile_mask(rows_ok, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
    elif BLOCK_D != HEAD_DIM:
        tile = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile
