"""Forward flash attention: online softmax over key tiles, log-sum-exp saved for the backward.

One program handles BLOCK_M query rows of one (sequence, query head). It walks the spans of keys
(see ``tiles``); inside a span, key tiles fall in three groups: tiles at the window edges that
need window masks, full tiles that need none (for bidirectional attention, all but the span's
last partial tile), and the bounds-masked tail. Loads and dots sit in branch-free loops, so
Triton software-pipelines them.

Jit functions take no structs, so pointers, strides and shapes travel as flat argument lists, and
the calls of one helper repeat them (``duplicates`` reports those as pairs): the fast pass and the
exact redo call the same ``_attend_spans`` with another constexpr, and the padded and packed
kernels share every helper; the logic itself exists once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import (
    INTERPRETING,
    LOG2E,
    autotuned,
    dot_precision,
    ensure_allocator,
    hopper_path,
    launch_shape,
    mask_args,
    pack_gqa,
    seqlen_bucket,
    tma_aligned,
    unit_last_stride,
)
from .tiles import (
    clip_to_window,
    convert,
    load_tile,
    mma,
    opaque,
    query_rows,
    real_keys,
    sequence_bounds,
    span_bounds,
    tanh,
    tile_mask,
    window_allowed,
)


@triton.jit
def nonfinite(values):
    """Bool tile: which elements are NaN or +-inf (an exponent test, immune to fast-math folding)."""
    bits = values.to(tl.float32).to(tl.int32, bitcast=True)
    return (bits & 0x7F800000) == 0x7F800000


@triton.jit
def seen_product(acc, weights, seen, value_rows, row_stride, rows_left, cols_ok):
    """acc + weights @ values over the pairs `seen` marks only, exactly: value row j (read at
    value_rows + j * row_stride, j < rows_left) reaches only the rows that see key j, in IEEE arithmetic
    (a NaN there makes the element NaN whatever its weight), as the reference backend defines. For the
    tiles that mask pairs one by one (window edges) and hold non-finite values, where a dot would spread
    0 * NaN to the rows that do not see them. One key at a time: a rare path."""
    keys = tl.arange(0, weights.shape[1])
    rows_left = tl.zeros_like(cols_ok.to(tl.int32)) + rows_left  # a vector: the interpreter masks with no scalars
    for j in range(weights.shape[1]):
        weight = tl.sum(tl.where(keys[None, :] == j, weights, 0.0), axis=1)
        sees = tl.max(tl.where((keys[None, :] == j) & seen, 1, 0), axis=1) > 0
        value = tl.load(value_rows + j * row_stride, mask=cols_ok & (j < rows_left), other=0.0).to(tl.float32)
        acc += tl.where(sees[:, None], weight[:, None] * value[None, :], 0.0)
    return acc


@triton.jit
def any_nonfinite(tile):
    """Whether a 2-D tile holds a NaN or an inf (a scalar)."""
    return tl.max(tl.max(nonfinite(tile).to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def nan_if_infinite(x):
    """Non-finite results are reported as NaN on every backend (an inf can come out as NaN elsewhere)."""
    return tl.where(tl.abs(x) == float("inf"), float("nan"), x)


@triton.jit
def folded_scores(qk, qk_scale, softcap_scale, SOFTCAP: tl.constexpr):
    """(raw, scale): scores in log2 units are raw * scale, so the row max is taken on raw scores (their min
    when scale < 0, see NEGATIVE_SCALE) and the scale folds into the exp2 argument as one FFMA
    (raw * scale - m). With softcap the scale is softcap * log2(e) > 0."""
    if SOFTCAP:
        return tanh(qk * qk_scale), softcap_scale
    return qk, qk_scale


@triton.jit
def excluded(raw, allowed, NEGATIVE_SCALE: tl.constexpr):
    """Raw scores with the pairs `allowed` does not mark set to the value no row max (min when the scale is
    negative, see folded_scores) takes: -inf, or +inf."""
    if NEGATIVE_SCALE:
        return tl.where(allowed, raw, float("inf"))
    return tl.where(allowed, raw, float("-inf"))


@triton.jit
def inclusive_sums(values, SIZE: tl.constexpr):
    """Inclusive prefix sums of an int32 vector of SIZE (a power of two >= 8) elements, as masked sums (the
    Hopper warp specialization rejects tt.scan, tl.cumsum) in two levels: within rows of 8, then over the
    rows' totals. SIZE x 8 terms, not the SIZE^2 of one masked sum, which at 64 held 32 registers a thread
    and spilled in the 40-register partition that runs the tile schedule in the warp-specialized kernel."""
    ROWS: tl.constexpr = SIZE // 8
    grid = tl.reshape(values, (ROWS, 8))
    cols = tl.arange(0, 8)
    within = tl.sum(tl.where(cols[None, None, :] <= cols[None, :, None], grid[:, None, :], 0), axis=2)
    rows = tl.arange(0, ROWS)
    totals = tl.sum(grid, axis=1)
    before = tl.sum(tl.where(rows[None, :] < rows[:, None], totals[None, :], 0), axis=1)
    return tl.reshape(before[:, None] + within, (SIZE,))


@triton.jit
def _tiles_ending(
    CuSeqlensQ,
    chunk,
    num_seqs,
    before,
    work,
    ROWS_PER_TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SCHEDULE_BLOCK: tl.constexpr,
):
    """Of sequences [chunk, chunk + SCHEDULE_BLOCK), after `before` tiles: (how many end at or before tile
    `work`, the last such end, the tiles up to the chunk's end)."""
    idx = chunk + tl.arange(0, SCHEDULE_BLOCK)
    ok = idx < num_seqs
    lengths = tl.load(CuSeqlensQ + idx + 1, mask=ok, other=0) - tl.load(CuSeqlensQ + idx, mask=ok, other=0)
    tiles = tl.cdiv(lengths * ROWS_PER_TOKEN, BLOCK_M)
    ends = before + inclusive_sums(tiles, SCHEDULE_BLOCK)
    done = ok & (ends <= work)
    return tl.sum(done.to(tl.int32), axis=0), tl.max(tl.where(done, ends, 0), axis=0), before + tl.sum(tiles, axis=0)


@triton.jit
def scheduled_tile(
    CuSeqlensQ,
    num_seqs,
    work,
    ROWS_PER_TOKEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SCHEDULE_BLOCK: tl.constexpr,
    ONE_CHUNK: tl.constexpr,
):
    """(sequence, row tile) of work item `work`, the row tiles of all sequences numbered in order; past the
    last tile the sequence is num_seqs. Prefix sums of tiles per sequence over cu_seqlens, on the device: no
    host sync (CUDA-graph capturable), and no CTA is spent on tiles past a sequence's end. ONE_CHUNK
    (num_seqs <= SCHEDULE_BLOCK): no loop, as the Hopper warp specialization needs (one loop per kernel)."""
    if ONE_CHUNK:
        seq, first, _ = _tiles_ending(CuSeqlensQ, 0, num_seqs, 0, work, ROWS_PER_TOKEN, BLOCK_M, SCHEDULE_BLOCK)
    else:
        seq = 0
        first = 0
        before = 0
        for chunk in range(0, num_seqs, SCHEDULE_BLOCK):
            done, last_end, before = _tiles_ending(
                CuSeqlensQ, chunk, num_seqs, before, work, ROWS_PER_TOKEN, BLOCK_M, SCHEDULE_BLOCK
            )
            seq += done
            first = tl.maximum(first, last_end)
    return seq, work - first


@triton.jit
def block_rows(tile_first, head, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, PACK_GQA: tl.constexpr):
    """(token, query head) of each row of the tile of rows [tile_first, tile_first + BLOCK_M); without
    PACK_GQA the head is `head` for every row."""
    rows = tile_first + tl.arange(0, BLOCK_M)
    if PACK_GQA:
        tokens = rows // GROUP
        heads = head * GROUP + rows % GROUP
    else:
        tokens = rows
        heads = head
    return tokens, heads


@triton.jit
def _attend_tiles(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
    KDesc,
    VDesc,
    KeyMask,
    start,
    end,
    offs_m,
    offs_d,
    offset,
    stride_ks,
    stride_vs,
    window_left,
    window_right,
    qk_scale,
    softcap_scale,
    MASKED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    EXACT: tl.constexpr,
    TMA: tl.constexpr,
    SPECIALIZE: tl.constexpr,
    NEGATIVE_SCALE: tl.constexpr,
):
    """Fold keys [start, end) into (acc, l_i, m_i) (m_i in log2 units); MASKED applies window, bound and
    padding masks. By pointers, V of padding keys is never loaded (in fp32 full tiles it is: see the redo).
    TMA (the Hopper paths) reads K tiles through the descriptor KDesc, bounded by the sequence (keys past its
    end read as zeros), padding keys' K too (their scores are masked), and V tiles through VDesc unless a key
    mask is given (then by masked pointer loads, so that padding keys' V is never read and no redo is needed
    for it); a full tile's scores are masked only where its mask bits hold a hole. SPECIALIZE: the loop is
    warp-specialized (a producer partition issues the loads, two consumer warpgroups compute); otherwise
    Triton software-pipelines it. EXACT (MASKED tiles only, never TMA) also keeps non-finite V of keys that
    only some rows see away from the others."""
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=SPECIALIZE):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        if TMA:
            k = KDesc.load([start_n, 0])
        else:
            k = load_tile(K + offs_n[:, None] * stride_ks + offs_d[None, :], n_ok, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        raw, scale = folded_scores(mma(q, tl.trans(k), UPCAST, PRECISION), qk_scale, softcap_scale, SOFTCAP)
        keys_ok = n_ok  # keys that are real and inside the span: V of the others is never loaded
        if HAS_MASK:
            keys_ok = keys_ok & real_keys(KeyMask, offs_n, n_ok, MASKED)
        allowed = keys_ok[None, :]
        if MASKED and (WINDOW_LEFT or WINDOW_RIGHT):
            allowed = allowed & window_allowed(
                offs_m, offs_n, offset, window_left, window_right, WINDOW_LEFT, WINDOW_RIGHT
            )
        if TMA and HAS_MASK and not MASKED:  # a full tile: bits read, scores masked only where it holds a hole
            if tl.min(keys_ok.to(tl.int32), axis=0) == 0:
                raw = excluded(raw, allowed, NEGATIVE_SCALE)
        elif MASKED or HAS_MASK:
            raw = excluded(raw, allowed, NEGATIVE_SCALE)
        if NEGATIVE_SCALE:  # raw * scale with scale < 0: the largest score is at the smallest raw one
            m_new = tl.maximum(m_i, tl.min(raw, axis=1) * scale)
        else:
            m_new = tl.maximum(m_i, tl.max(raw, axis=1) * scale)
        if MASKED or HAS_MASK:  # a row may have seen no key yet: keep exp2 away from -inf - -inf
            m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_base = m_new
        p = tl.exp2(raw * scale - m_base[:, None])
        alpha = tl.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if TMA and not HAS_MASK:
            v = VDesc.load([start_n, 0])
        else:
            v = load_tile(
                V + offs_n[:, None] * stride_vs + offs_d[None, :],
                keys_ok,
                offs_d,
                MASKED or (HAS_MASK and V.dtype.element_ty != tl.float32),
                HEAD_DIM,
                BLOCK_D,
            )
        if EXACT and MASKED and (WINDOW_LEFT or WINDOW_RIGHT):
            if any_nonfinite(v):
                acc = seen_product(
                    acc * alpha[:, None],
                    p,
                    allowed,
                    V + start_n * stride_vs + offs_d,
                    stride_vs,
                    end - start_n,
                    offs_d < HEAD_DIM,
                )
            else:
                acc = acc * alpha[:, None] + mma(convert(p, v.dtype, UPCAST), v, UPCAST, PRECISION)
        else:
            acc = acc * alpha[:, None] + mma(convert(p, v.dtype, UPCAST), v, UPCAST, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attend_spans(
    q,
    K,
    V,
    KDesc,
    VDesc,
    KeyMask,
    KeySpans,
    num_spans,
    k_len,
    row_first,
    row_last,
    offs_m,
    offs_d,
    offset,
    stride_ks,
    stride_vs,
    window_left,
    window_right,
    qk_scale,
    softcap_scale,
    HAS_MASK: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    EXACT: tl.constexpr,
    TMA: tl.constexpr,
    SPECIALIZE: tl.constexpr,
    NEGATIVE_SCALE: tl.constexpr,
    EVEN_KEYS: tl.constexpr,
):
    """(acc, l_i, m_i) of one query block over every span of keys it may see. EXACT: every tile masked and
    read by pointers, so that no non-finite value of a key a row does not see can reach it (the slow redo).
    TMA: K/V tiles through the descriptors. SPECIALIZE (TMA, no mask, no window): one warp-specialized loop
    over [0, k_len), as Triton's Hopper warp specialization takes a kernel with a single loop only;
    bounds-masked unless EVEN_KEYS (k_len a multiple of every BLOCK_N: every tile full)."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if SPECIALIZE:
        hi = tl.where(num_spans > 0, k_len, 0)
        acc, l_i, m_i = _attend_tiles(
            acc,
            l_i,
            m_i,
            q,
            K,
            V,
            KDesc,
            VDesc,
            KeyMask,
            0,
            hi,
            offs_m,
            offs_d,
            offset,
            stride_ks,
            stride_vs,
            window_left,
            window_right,
            qk_scale,
            softcap_scale,
            not EVEN_KEYS,
            HAS_MASK,
            WINDOW_LEFT,
            WINDOW_RIGHT,
            SOFTCAP,
            HEAD_DIM,
            BLOCK_D,
            BLOCK_N,
            UPCAST,
            PRECISION,
            False,
            True,
            True,
            NEGATIVE_SCALE,
        )
    else:
        # Keys every row of the block may see lie in [full_lo, full_hi); some row may see [lo, hi).
        for span in range(num_spans):
            lo, hi = span_bounds(KeySpans, span, k_len, HAS_MASK)
            lo, hi, full_lo, full_hi = clip_to_window(
                lo, hi, row_first, row_last, offset, window_left, window_right, WINDOW_LEFT, WINDOW_RIGHT
            )
            hi = tl.maximum(hi, lo)
            if EXACT:  # the slow redo: the span as one masked range
                acc, l_i, m_i = _attend_tiles(
                    acc,
                    l_i,
                    m_i,
                    q,
                    K,
                    V,
                    KDesc,
                    VDesc,
                    KeyMask,
                    lo,
                    hi,
                    offs_m,
                    offs_d,
                    offset,
                    stride_ks,
                    stride_vs,
                    window_left,
                    window_right,
                    qk_scale,
                    softcap_scale,
                    True,
                    HAS_MASK,
                    WINDOW_LEFT,
                    WINDOW_RIGHT,
                    SOFTCAP,
                    HEAD_DIM,
                    BLOCK_D,
                    BLOCK_N,
                    UPCAST,
                    PRECISION,
                    True,
                    False,
                    False,
                    NEGATIVE_SCALE,
                )
            else:
                full_start = tl.minimum(lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_N) * BLOCK_N, hi)
                full_end = full_start + (tl.maximum(full_hi - full_start, 0) // BLOCK_N) * BLOCK_N
                # By pointers at 16 bits the tail starts at an opaque copy of full_end, so that its first tile's
                # addresses are computed after the full tiles, not before them and kept live (8 B spilled at
                # 128x128 with GQA packing). On TMA or at fp32 the copy costs more than it saves.
                tail_skip: tl.constexpr = UPCAST or TMA or V.dtype.element_ty == tl.float32
                if WINDOW_LEFT:  # without a left window the span starts with full tiles
                    acc, l_i, m_i = _attend_tiles(
                        acc,
                        l_i,
                        m_i,
                        q,
                        K,
                        V,
                        KDesc,
                        VDesc,
                        KeyMask,
                        lo,
                        full_start,
                        offs_m,
                        offs_d,
                        offset,
                        stride_ks,
                        stride_vs,
                        window_left,
                        window_right,
                        qk_scale,
                        softcap_scale,
                        True,
                        HAS_MASK,
                        WINDOW_LEFT,
                        WINDOW_RIGHT,
                        SOFTCAP,
                        HEAD_DIM,
                        BLOCK_D,
                        BLOCK_N,
                        UPCAST,
                        PRECISION,
                        False,
                        TMA,
                        False,
                        NEGATIVE_SCALE,
                    )
                acc, l_i, m_i = _attend_tiles(
                    acc,
                    l_i,
                    m_i,
                    q,
                    K,
                    V,
                    KDesc,
                    VDesc,
                    KeyMask,
                    full_start,
                    full_end,
                    offs_m,
                    offs_d,
                    offset,
                    stride_ks,
                    stride_vs,
                    window_left,
                    window_right,
                    qk_scale,
                    softcap_scale,
                    False,
                    HAS_MASK,
                    WINDOW_LEFT,
                    WINDOW_RIGHT,
                    SOFTCAP,
                    HEAD_DIM,
                    BLOCK_D,
                    BLOCK_N,
                    UPCAST,
                    PRECISION,
                    False,
                    TMA,
                    False,
                    NEGATIVE_SCALE,
                )
                acc, l_i, m_i = _attend_tiles(
                    acc,
                    l_i,
                    m_i,
                    q,
                    K,
                    V,
                    KDesc,
                    VDesc,
                    KeyMask,
                    opaque(full_end, tail_skip),
                    hi,
                    offs_m,
                    offs_d,
                    offset,
                    stride_ks,
                    stride_vs,
                    window_left,
                    window_right,
                    qk_scale,
                    softcap_scale,
                    True,
                    HAS_MASK,
                    WINDOW_LEFT,
                    WINDOW_RIGHT,
                    SOFTCAP,
                    HEAD_DIM,
                    BLOCK_D,
                    BLOCK_N,
                    UPCAST,
                    PRECISION,
                    False,
                    TMA,
                    False,
                    NEGATIVE_SCALE,
                )
    return acc, l_i, m_i


FWD_TILES = {  # the pointer path, on Hopper and Ampere, and the TMA span walk (TMA without HOPPER) on Hopper
    "half": [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
    # wgmma and spill-free on sm_90a in every layout (128x64 w8 s2 spilled 8-208 B outside padded); spills on sm_80
    "half_wide": [(128, 32, 8, 2)],
    "fp32": [(32, 64, 8, 2), (16, 64, 4, 2)],
}
# Tiles only Ampere tunes over besides FWD_TILES: under 64 query rows a dot is below wgmma's minimum and
# compiles to mma.sync on Hopper; on sm_80 they are the spill-free head-dim-256 choices, and fp32's 16x32 is
# its only spill-free one (on sm_90a that tile has an 8-byte stack frame, an unused local LLVM leaves).
FWD_AMPERE_TILES = {
    "half": [(32, 64, 4, 2)],
    "half_wide": [(32, 64, 4, 2), (16, 64, 4, 2)],
    "fp32": [(16, 32, 8, 2)],
}
# The Hopper path (HOPPER: TMA, warp specialization; 16-bit inputs only). 4 warps: Triton's Hopper warp
# specialization makes them the producer and adds two consumer warpgroups of 4 warps each. At least one
# tile of lookahead: 3-4 stages where shared memory allows (128 x 128 at d128 fits 2).
FWD_HOPPER_TILES = {
    "half": [(128, 128, 4, 2), (128, 64, 4, 3), (128, 64, 4, 4), (64, 64, 4, 3)],
    "half_wide": [(64, 64, 4, 2)],
}


@triton.autotune(
    key=[
        "SEQLEN_BUCKET",
        "HEAD_DIM",
        "GROUP",
        "IS_VARLEN",
        "HAS_MASK",
        "WINDOW_LEFT",
        "WINDOW_RIGHT",
        "SOFTCAP",
        "TMA",
        "HOPPER",
        "PACK_GQA",
    ],
    **autotuned(FWD_TILES, FWD_HOPPER_TILES, FWD_AMPERE_TILES),
)
@triton.jit
def attention_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lse,
    KeyMask,
    KeySpans,
    NumSpans,
    CuSeqlensQ,
    CuSeqlensK,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_lh,
    stride_mb,
    stride_sb,
    seqlen_q,
    seqlen_k,
    num_seqs,
    window_left,
    window_right,
    qk_scale,
    softcap_scale,
    SEQLEN_BUCKET,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_QUERIES: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    HOPPER: tl.constexpr,
    NEGATIVE_SCALE: tl.constexpr,
    EVEN_KEYS: tl.constexpr,
    PACK_GQA: tl.constexpr,
    SCHEDULE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One tile of BLOCK_M query rows. Rows are tokens of one query head, or with PACK_GQA (token, head)
    pairs of the GROUP query heads that share the program's KV head. SCHEDULE_BLOCK > 0 (packed batches):
    axis 0 numbers the (sequence, tile) work items (`scheduled_tile`), else it is the tile and axis 2 the
    sequence. TMA (16-bit on Hopper): K, V unless HAS_MASK, and Q/O unless PACK_GQA gathers their rows,
    through descriptors bounded by the sequence; otherwise pointers (cp.async). HOPPER (TMA, no mask, no
    window, no packing): one warp-specialized key loop; otherwise the span walk, software-pipelined."""
    head = tl.program_id(1)
    # Masked head-dim-256 tiles keep pointer loads: with K on TMA, 128x64 spills 88 bytes on sm_90a.
    DESCRIPTORS: tl.constexpr = TMA and not (HAS_MASK and BLOCK_D > 128)
    # The Hopper path has no early returns (its warp-specialization pass takes structured control flow
    # only): a tile past its sequence's end walks no keys and every store it makes is masked or clipped.
    if SCHEDULE_BLOCK > 0:
        batch, pid_m = scheduled_tile(
            CuSeqlensQ, num_seqs, tl.program_id(0), GROUP if PACK_GQA else 1, BLOCK_M, SCHEDULE_BLOCK, HOPPER
        )
        past_end = batch >= num_seqs
        if not HOPPER:
            if past_end:
                return
        batch = tl.where(past_end, num_seqs - 1, batch)
        pid_m = tl.where(past_end, (1 << 30) // BLOCK_M, pid_m)
    else:
        pid_m = tl.program_id(0)
        batch = tl.program_id(2)
    q_start, q_len, k_start, k_len = sequence_bounds(CuSeqlensQ, CuSeqlensK, batch, seqlen_q, seqlen_k, IS_VARLEN)
    if PACK_GQA:
        rows = q_len * GROUP
    else:
        rows = q_len
    tile_first = pid_m * BLOCK_M
    if not HOPPER:  # past its sequence's end (the Hopper path masks instead: see above)
        if tile_first >= rows:
            return
    tile_last = tl.maximum(tl.minimum(tile_first + BLOCK_M, rows) - 1, tile_first)
    offs_m, heads = block_rows(tile_first, head, GROUP, BLOCK_M, PACK_GQA)
    if PACK_GQA:
        kv_head = head
        row_first = tile_first // GROUP
        row_last = tile_last // GROUP
    else:
        kv_head = head // GROUP
        row_first = tile_first
        row_last = tile_last
    offs_d = tl.arange(0, BLOCK_D)
    KeyMask += batch.to(tl.int64) * stride_mb
    KeySpans += batch.to(tl.int64) * stride_sb
    rows_in, rows_real, num_spans = query_rows(KeyMask, NumSpans, batch, offs_m, q_len, HAS_MASK, MASK_QUERIES)
    num_spans = tl.where(tile_first < rows, num_spans, 0)

    Q += batch.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qs
    if DESCRIPTORS and not PACK_GQA:
        q_desc = tl.make_tensor_descriptor(Q + head * stride_qh, [q_len, HEAD_DIM], [stride_qs, 1], [BLOCK_M, BLOCK_D])
        q = q_desc.load([row_first, 0])
    else:
        q_rows = offs_m.to(tl.int64) * stride_qs + heads * stride_qh
        q = load_tile(Q + q_rows[:, None] + offs_d[None, :], rows_in, offs_d, True, HEAD_DIM, BLOCK_D)
    K += batch.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_ks + kv_head * stride_kh
    V += batch.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vs + kv_head * stride_vh
    k_desc = K
    v_desc = V
    if DESCRIPTORS:
        k_desc = tl.make_tensor_descriptor(K, [k_len, HEAD_DIM], [stride_ks, 1], [BLOCK_N, BLOCK_D])
        if not HAS_MASK:  # masked V tiles are read by pointers (see _attend_tiles)
            v_desc = tl.make_tensor_descriptor(V, [k_len, HEAD_DIM], [stride_vs, 1], [BLOCK_N, BLOCK_D])
    offset = k_len - q_len
    acc, l_i, m_i = _attend_spans(
        q,
        K,
        V,
        k_desc,
        v_desc,
        KeyMask,
        KeySpans,
        num_spans,
        k_len,
        row_first,
        row_last,
        offs_m,
        offs_d,
        offset,
        stride_ks,
        stride_vs,
        window_left,
        window_right,
        qk_scale,
        softcap_scale,
        HAS_MASK,
        WINDOW_LEFT,
        WINDOW_RIGHT,
        SOFTCAP,
        HEAD_DIM,
        BLOCK_M,
        BLOCK_D,
        BLOCK_N,
        UPCAST,
        PRECISION,
        False,
        DESCRIPTORS,
        HOPPER,
        NEGATIVE_SCALE,
        EVEN_KEYS,
    )
    # The epilogue's rows again, from an opaque copy of tile_first: kept live through the key walk instead,
    # ptxas (Triton 3.9's --regAllocOptLevel=2) spilled them there (8-48 B at 128x128 and in fp32 tiles).
    # Not with GQA packing: there the copy moves the pressure into the key loops (56 B at 128x128, not 8).
    offs_m, heads = block_rows(opaque(tile_first, UPCAST or PACK_GQA), head, GROUP, BLOCK_M, PACK_GQA)
    rows_in = offs_m < q_len
    rows_real = rows_in
    if MASK_QUERIES:
        rows_real = real_keys(KeyMask, offs_m, rows_in, True)
    Out += batch.to(tl.int64) * stride_ob + q_start.to(tl.int64) * stride_os
    Lse += batch.to(tl.int64) * stride_lb + q_start
    if WINDOW_LEFT or WINDOW_RIGHT or (HAS_MASK and V.dtype.element_ty == tl.float32):
        # A non-finite V of a key a row does not see (at a window edge; for fp32, whose full tiles load V
        # unmasked to stay spill-free, also padding) reaches it as 0 * NaN and stays non-finite in acc to
        # the end. Rare: then redo the block exactly, by pointers. (Each branch stores its own result, so the
        # first pass's registers are free during the redo.) Never on a TMA path (no window; V of padding
        # keys never read).
        if any_nonfinite(acc):
            acc, l_i, m_i = _attend_spans(
                q,
                K,
                V,
                k_desc,
                v_desc,
                KeyMask,
                KeySpans,
                num_spans,
                k_len,
                row_first,
                row_last,
                offs_m,
                offs_d,
                offset,
                stride_ks,
                stride_vs,
                window_left,
                window_right,
                qk_scale,
                softcap_scale,
                HAS_MASK,
                WINDOW_LEFT,
                WINDOW_RIGHT,
                SOFTCAP,
                HEAD_DIM,
                BLOCK_M,
                BLOCK_D,
                BLOCK_N,
                UPCAST,
                PRECISION,
                True,
                False,
                False,
                NEGATIVE_SCALE,
                False,
            )
            _store_block(
                acc,
                l_i,
                m_i,
                rows_in,
                rows_real,
                Out,
                Lse,
                offs_m,
                offs_d,
                head,
                heads,
                q_len,
                row_first,
                stride_os,
                stride_oh,
                stride_lh,
                HEAD_DIM,
                BLOCK_M,
                BLOCK_D,
                UPCAST,
                DESCRIPTORS and not PACK_GQA,
            )
        else:
            _store_block(
                acc,
                l_i,
                m_i,
                rows_in,
                rows_real,
                Out,
                Lse,
                offs_m,
                offs_d,
                head,
                heads,
                q_len,
                row_first,
                stride_os,
                stride_oh,
                stride_lh,
                HEAD_DIM,
                BLOCK_M,
                BLOCK_D,
                UPCAST,
                DESCRIPTORS and not PACK_GQA,
            )
    else:
        _store_block(
            acc,
            l_i,
            m_i,
            rows_in,
            rows_real,
            Out,
            Lse,
            offs_m,
            offs_d,
            head,
            heads,
            q_len,
            row_first,
            stride_os,
            stride_oh,
            stride_lh,
            HEAD_DIM,
            BLOCK_M,
            BLOCK_D,
            UPCAST,
            DESCRIPTORS and not PACK_GQA,
        )


@triton.jit
def _store_block(
    acc,
    l_i,
    m_i,
    rows_in,
    rows_real,
    Out,
    Lse,
    offs_m,
    offs_d,
    head,
    heads,
    q_len,
    row_first,
    stride_os,
    stride_oh,
    stride_lh,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    TMA: tl.constexpr,
):
    """Normalise and store a query block (Out and Lse at this sequence's first token; row i is token
    offs_m[i] of query head heads[i], or of `head`). l_i is 0 exactly on rows that saw no key or only -inf
    scores (zeros, lse = -inf) and NaN on rows with a NaN or +inf score (NaN out and lse). TMA: one
    descriptor store of rows [row_first, row_first + BLOCK_M) of `head`, clipped at q_len rows."""
    row_ok = rows_real & (l_i != 0)
    l_safe = tl.where(row_ok, l_i, 1.0)
    out = convert(tl.where(row_ok[:, None], nan_if_infinite(acc / l_safe[:, None]), 0.0), Out.dtype.element_ty, UPCAST)
    lse = tl.where(row_ok, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    if TMA:
        o_desc = tl.make_tensor_descriptor(
            Out + head * stride_oh, [q_len, HEAD_DIM], [stride_os, 1], [BLOCK_M, BLOCK_D]
        )
        o_desc.store([row_first, 0], out)
    else:
        out_rows = offs_m.to(tl.int64) * stride_os + heads * stride_oh
        tl.store(Out + out_rows[:, None] + offs_d[None, :], out, mask=tile_mask(rows_in, offs_d, HEAD_DIM, BLOCK_D))
    tl.store(Lse + heads.to(tl.int64) * stride_lh + offs_m, lse, mask=rows_in)


def score_scales(softmax_scale: float, softcap: float) -> tuple[float, float]:
    """(qk_scale, softcap_scale): scores in log2 units are qk * qk_scale, or tanh(qk * qk_scale) * softcap_scale."""
    if softcap > 0:
        return softmax_scale / softcap, softcap * LOG2E
    return softmax_scale * LOG2E, 0.0


def token_strides(tensor: torch.Tensor, is_varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; packed tensors have no batch axis."""
    if is_varlen:
        return 0, tensor.stride(0), tensor.stride(1)
    return tensor.stride(0), tensor.stride(1), tensor.stride(2)


def lse_strides(lse: torch.Tensor, is_varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of the log-sum-exp: (B, H, S) padded, (H, T) packed."""
    return (0, lse.stride(0)) if is_varlen else (lse.stride(0), lse.stride(1))


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout, options
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on an ``llm2vec_fast`` AttentionLayout (key mask as KeySpans) and
    AttentionOptions; returns (out like q, float32 lse (B, Hq, Sq) or (Hq, Tq)). The Hopper paths (TMA, and
    warp specialization where `warp_specialized` allows) are taken where `hopper_path` says so, the inputs
    are 16-bit and every tensor suits TMA; GQA packing where `pack_gqa` says so; packed batches get the
    device-side tile schedule (no host sync)."""
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    shape = launch_shape(q, k, layout, options)
    heads_q, heads_kv, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(layout.lse_shape(q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or shape.seqlen_q == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    softcap = options.softcap
    qk_scale, softcap_scale = score_scales(options.softmax_scale, softcap)
    group = heads_q // heads_kv
    packed = pack_gqa(group, shape.is_varlen)
    tma = hopper_path(q.device) and descriptor_loads(shape, q.dtype) and tma_aligned(q, k, v, out)
    hopper = tma and warp_specialized(shape, packed)
    if tma:
        ensure_allocator(q.device)
    rows_per_token = group if packed else 1
    heads = heads_kv if packed else heads_q
    grid, bucket, schedule_block = _tile_grid(shape, q.shape[0], rows_per_token, heads, hopper)
    attention_fwd_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        *mask_args(shape, layout, placeholder=q),
        *token_strides(q, shape.is_varlen),
        *token_strides(k, shape.is_varlen),
        *token_strides(v, shape.is_varlen),
        *token_strides(out, shape.is_varlen),
        *lse_strides(lse, shape.is_varlen),
        shape.stride_mask,
        shape.stride_spans,
        shape.seqlen_q,
        shape.seqlen_k,
        shape.batch,
        shape.window_left,
        shape.window_right,
        qk_scale,
        softcap_scale,
        bucket,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        IS_VARLEN=shape.is_varlen,
        HAS_MASK=shape.key_mask is not None,
        MASK_QUERIES=shape.mask_queries,
        WINDOW_LEFT=shape.window_left >= 0,
        WINDOW_RIGHT=shape.window_right >= 0,
        SOFTCAP=softcap > 0,
        UPCAST=INTERPRETING,
        PRECISION=dot_precision(q.dtype),
        TMA=tma,
        HOPPER=hopper,
        NEGATIVE_SCALE=qk_scale < 0 and softcap == 0,
        EVEN_KEYS=not shape.is_varlen and shape.seqlen_k % 128 == 0,  # 128: the widest BLOCK_N
        PACK_GQA=packed,
        SCHEDULE_BLOCK=schedule_block,
    )
    return out, lse


SCHEDULE_CHUNK = 64  # sequences per step of `scheduled_tile` (64 x 64 elements; 128 breaks warp specialization)


def _tile_grid(shape, tokens_q: int, rows_per_token: int, heads: int, one_chunk: bool):
    """(grid, autotuning bucket, SCHEDULE_BLOCK) from what the host knows without a sync. Padded: tiles of the
    padded length x heads x batch. Packed: work items (sequence, tile) numbered on the device, the grid an
    upper bound on their count (at most one tile per sequence too many, or the padded grid where smaller),
    and tiles tuned to the mean rows per sequence (total tokens / sequences), not the longest. `one_chunk`: the
    schedule may not loop (a warp-specialized kernel): more than SCHEDULE_CHUNK sequences take the padded grid."""
    rows_longest = shape.seqlen_q * rows_per_token
    schedule_block = min(triton.next_power_of_2(max(shape.batch, 16)), SCHEDULE_CHUNK) if shape.is_varlen else 0
    if schedule_block == 0 or (one_chunk and shape.batch > SCHEDULE_CHUNK):  # padded, or no loop allowed
        grid = lambda meta: (triton.cdiv(rows_longest, meta["BLOCK_M"]), heads, shape.batch)  # noqa: E731
        return grid, seqlen_bucket(rows_longest), 0

    def grid(meta):
        tiles = triton.cdiv(tokens_q * rows_per_token, meta["BLOCK_M"]) + shape.batch
        return min(tiles, shape.batch * triton.cdiv(rows_longest, meta["BLOCK_M"])), heads, 1

    return grid, seqlen_bucket(tokens_q * rows_per_token // shape.batch), schedule_block


def descriptor_loads(shape, dtype: torch.dtype) -> bool:
    """Whether a Hopper launch reads K (V too without a key mask, Q/O where no GQA packing gathers them) through
    TMA descriptors: 16-bit batches without a window, where the sm_90a static proxy (benchmarks/NOTES.md,
    "v2.3") is not worse than the pointer path's. Windowed batches keep pointers: densely, TMA's best tile
    issues more warp-instructions per score block than the pointer path's 128x128; with a key mask its
    larger tiles spill. fp32 (exact dots on CUDA cores) keeps pointers too."""
    return dtype != torch.float32 and shape.window_left < 0 and shape.window_right < 0


def warp_specialized(shape, packed: bool) -> bool:
    """Whether the Hopper (TMA) key walk is one warp-specialized loop. Triton's Hopper warp specialization
    (3.9) takes a kernel whose only loop is the specialized one and whose loads are all TMA: no window edges
    (loops of their own), no key mask (its bits and V tiles are pointer loads, its spans nested loops) and no
    GQA packing (its query rows are gathered by pointers). Those walk their spans with descriptor loads in
    software-pipelined loops."""
    plain = shape.window_left < 0 and shape.window_right < 0 and shape.key_mask is None
    return plain and not packed
