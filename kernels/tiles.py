"""``@triton.jit`` tile helpers shared by the forward and backward attention kernels.

Masking model (mirrors ``llm2vec_fast.backends.reference``): query row ``i`` of a sequence with
``q_len`` queries and ``k_len`` keys sits at key position ``i + k_len - q_len`` and may see keys
``j`` with ``pos - window_left <= j <= pos + window_right`` (causal = right window 0), restricted
to real keys. A key-padding mask arrives as *spans* of keys (``llm2vec_fast.key_masks``) plus
per-key mask bytes: kernels loop over spans and over tiles inside them, so long stretches of
padding are never visited; the shorter holes inside a span are masked with the mask bytes.
"""

import triton
import triton.language as tl


# Compiler fences: a value the compiler would keep live through a loop (and spill) is recomputed where it is
# used instead, from a copy the compiler cannot prove equal to the first.
@triton.jit
def opaque(value, SKIP: tl.constexpr):
    """`value` (an int32 scalar) through an asm the compiler can neither see through nor merge: what is derived
    from the copy is computed where it is used, not kept live from the first computation. SKIP: `value`
    itself (the interpreter runs no asm)."""
    if SKIP:
        return value
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [value], tl.int32, False, 1)


@triton.jit
def program_id_again(axis: tl.constexpr, SKIP: tl.constexpr):
    """tl.program_id(axis) read again from its special register by an asm the compiler may not merge with the
    first read (which it would keep live instead). SKIP: tl.program_id itself (the interpreter runs no asm)."""
    if SKIP:
        return tl.program_id(axis)
    zero = tl.full([], 0, tl.int32)
    if axis == 0:
        return tl.inline_asm_elementwise("mov.u32 $0, %ctaid.x;", "=r,r", [zero], tl.int32, False, 1)
    elif axis == 1:
        return tl.inline_asm_elementwise("mov.u32 $0, %ctaid.y;", "=r,r", [zero], tl.int32, False, 1)
    else:
        return tl.inline_asm_elementwise("mov.u32 $0, %ctaid.z;", "=r,r", [zero], tl.int32, False, 1)


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
def clip_to_window(
    lo,
    hi,
    row_first,
    row_last,
    offset,
    window_left,
    window_right,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
):
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
def window_allowed(
    offs_m, offs_n, offset, window_left, window_right, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr
):
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
