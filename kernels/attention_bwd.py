"""Backward flash attention: a delta preprocess, then one fused kernel (5 GEMMs per tile pair) or, when
asked to be deterministic, dK/dV and dQ in separate kernels.

Probabilities are recomputed from the saved log-sum-exp. The dK/dV program owns one key tile of one KV
head and loops over every query head of its GQA group, so the group reduction happens in registers. Per
(key tile, query tile) pair the fused kernel computes S = K Q^T, dP = V dO^T, dV += P^T dO, dK += dS^T Q
and dQ = dS K, the last added with fp32 atomics into a zeroed buffer that is scaled and cast after (the
order of the additions varies from run to run). ``deterministic=True`` (and Ampere, and head dim 256, see
``_fused``) runs the atomic-free pair instead: the dK/dV kernel without dQ and a dQ kernel that owns one
query tile of one query head (it recomputes P and dP: 7 GEMMs in all), bitwise reproducible.

Masks only on edges: inside a span, the query tiles that every key of the tile sees (no window edge, no
span tail) run without pair masks when the key tile itself is full (every key real and in bounds, K and V
finite): there, query rows that are padding load as zeros with lse = +inf, so their P and dS are exact
zeros without a select. Rows without any visible key have lse = -inf; they are read as +inf so their
probabilities are 0. Pairs a row does not see are selected out of P and dS in masked tiles, and their
non-finite q, k (and v through dP) never reach a gradient (``seen_product``), as in
``llm2vec_fast.backends.reference``.

As in ``attention_fwd``, the repeated lines ``duplicates`` reports here are the flat argument lists of one
helper's calls (the masked and unmasked query tiles of ``_dkdv_tiles``, fast pass and exact redo of
``_dkdv_group``/``_dq_spans``, the two kernels over ``_dkdv_program``), not copied logic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_fwd import any_nonfinite, lse_strides, nan_if_infinite, score_scales, seen_product, token_strides
from .launch import INTERPRETING, autotuned, dot_precision, launch_shape, mask_args, seqlen_bucket, unit_last_stride
from .tiles import (
    capped_scores,
    clip_to_window,
    convert,
    load_tile,
    mma,
    program_id_again,
    query_rows,
    real_keys,
    sequence_bounds,
    span_bounds,
    span_count,
    tile_mask,
    window_allowed,
)

# Tiles whose every GEMM runs on wgmma on sm_90a with no spill, padded and packed (BLOCK_N keys are the rows
# of four GEMMs, the head dim those of dQ^T). The fused kernel holds five accumulators: 16 query rows, head
# dims up to 128, sm_90a (see _fused). fp32 compiles to FMA (exact dots). At head dim 256 the dK/dV kernel runs
# two programs per 64-key tile, each accumulating half of the dK/dV columns (dkdv_split): its whole 64x256 dK
# and dV spill, and 32 keys are too few rows for wgmma. 16x64 w8 s2 is spill-free padded, dense and packed once
# every head-dim operand is a half tile (see _dkdv_program); 32x64 and 3 stages spill 450+ bytes.
BWD_TILES = {  # fp32 takes the pair on GPUs (_fused): its 16x32 w4 s2 spilled 900-992 bytes dense and packed
    "half": [(16, 128, 8, 2), (16, 64, 8, 2)],  # 16x64 duplicates S^T and dP^T in both warpgroups
}
DKDV_TILES = {
    "half": [(16, 128, 8, 2), (16, 64, 8, 2)],  # 128 keys: 2 warpgroups x 64 key rows, none duplicated
    "half_wide": [(16, 64, 8, 2)],
    "fp32": [(16, 32, 4, 2)],
}
# Ampere adds a fp32 dK/dV tile: on sm_80, under Triton 3.9's --regAllocOptLevel=2, 16x32 w4 spills 8 / 24 bytes
# padded / packed (a pointer held across the head loop) and w8 8 bytes dense, so each layout has a spill-free tile.
DKDV_AMPERE_TILES = {"fp32": [(16, 32, 8, 2)]}
DQ_TILES = {
    "half": [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3)],
    "half_wide": [(64, 32, 8, 2), (64, 16, 8, 2)],
    "fp32": [(16, 32, 8, 2)],  # 4 warps spill since rows that see no key store 0
}
_PREPROCESS_BLOCK_M = 64
_BWD_KEY = ["SEQLEN_BUCKET", "HEAD_DIM", "GROUP", "IS_VARLEN", "HAS_MASK", "WINDOW_LEFT", "WINDOW_RIGHT", "SOFTCAP"]


@triton.jit
def _rows_lse_delta(Lse, Delta, lse_offset, offs_m, rows_ok):
    """lse (log2 units, +inf for empty rows) and delta of the query rows offs_m."""
    lse = tl.load(Lse + lse_offset + offs_m, mask=rows_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + lse_offset + offs_m, mask=rows_ok, other=0.0)
    return lse, delta


@triton.jit
def attention_bwd_preprocess_kernel(
    Out,
    DOut,
    DLse,
    Delta,
    CuSeqlensQ,
    stride_ob,
    stride_os,
    stride_oh,
    stride_db,
    stride_ds,
    stride_dh,
    stride_lb,
    stride_lh,
    stride_glb,
    stride_glh,
    stride_gls,
    seqlen_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse, laid out like the log-sum-exp. dlse comes with autograd's strides
    (``lse.sum()`` gives all-zero ones) and is read as it is."""
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    q_start, q_len, _, _ = sequence_bounds(CuSeqlensQ, CuSeqlensQ, batch, seqlen_q, seqlen_q, IS_VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if pid_m * BLOCK_M >= q_len:
        return
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < q_len
    tokens = (q_start + offs_m).to(tl.int64)[:, None]
    o = load_tile(
        Out + batch.to(tl.int64) * stride_ob + tokens * stride_os + head * stride_oh + offs_d[None, :],
        rows_ok,
        offs_d,
        True,
        HEAD_DIM,
        BLOCK_D,
    )
    do = load_tile(
        DOut + batch.to(tl.int64) * stride_db + tokens * stride_ds + head * stride_dh + offs_d[None, :],
        rows_ok,
        offs_d,
        True,
        HEAD_DIM,
        BLOCK_D,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    lse_offset = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start
    if HAS_DLSE:
        dlse_offset = batch.to(tl.int64) * stride_glb + head.to(tl.int64) * stride_glh
        delta -= tl.load(DLse + dlse_offset + (q_start + offs_m).to(tl.int64) * stride_gls, mask=rows_ok, other=0.0)
    tl.store(Delta + lse_offset + offs_m, delta, mask=rows_ok)


@triton.jit
def _store_rows(
    Base, tokens, stride_s, values, rows_ok, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr
):
    """Store a gradient tile at rows `tokens` (a column of token indices); non-finite values as NaN."""
    tl.store(
        Base + tokens * stride_s + offs_d[None, :],
        convert(nan_if_infinite(values), Base.dtype.element_ty, UPCAST),
        mask=tile_mask(rows_ok, offs_d, HEAD_DIM, BLOCK_D),
    )


@triton.jit
def _add_rows_t(
    Base,
    offs_m,
    stride_s,
    values_t,
    rows_ok,
    offs_d,
    CHECK_ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Atomically add a transposed fp32 tile (head dim x rows offs_m) to Base's rows (relaxed: only the sum matters)."""
    ptrs = Base + (offs_m * stride_s)[None, :] + offs_d[:, None]  # int32 row offsets, as the q and dO loads'
    if CHECK_ROWS:
        tl.atomic_add(ptrs, values_t, mask=tl.trans(tile_mask(rows_ok, offs_d, HEAD_DIM, BLOCK_D)), sem="relaxed")
    elif BLOCK_D != HEAD_DIM:
        tl.atomic_add(ptrs, values_t, mask=(offs_d < HEAD_DIM)[:, None], sem="relaxed")
    else:
        tl.atomic_add(ptrs, values_t, sem="relaxed")


@triton.jit
def _dkdv_tiles(
    dk,
    dv,
    k,
    v,
    k_rest,
    v_rest,
    key_ok,
    offs_n,
    offs_d,
    offs_h,
    offs_r,
    q_base,
    do_base,
    dq_base,
    Lse,
    Delta,
    lse_offset,
    KeyMask,
    k_rows,
    k_nonfinite,
    start,
    end,
    q_hi,
    keys_left,
    offset,
    stride_qs,
    stride_ds,
    stride_dqs,
    stride_ks,
    window_left,
    window_right,
    qk_scale,
    softcap_scale,
    MASKED: tl.constexpr,
    MASK_QUERIES: tl.constexpr,
    FUSED_DQ: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_H: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    EXACT: tl.constexpr,
):
    """Fold query tiles [start, end) of one head into (dK, dV) and, FUSED_DQ, add their unscaled dQ to
    dq_base. MASKED selects pairs by window, bounds and padding; unmasked tiles lie inside the window and
    the span and meet a full, finite key tile, so padding rows (loaded as zeros, lse +inf) give exact zeros.
    EXACT (the slow redo of windowed tiles) keeps a non-finite q of a row out of the keys it does not see;
    k_nonfinite (windowed masked tiles) does the same for K in dQ.

    Every GEMM has 64+ rows for wgmma whatever BLOCK_M: four have the BLOCK_N keys as rows, and dQ is
    computed transposed, dQ^T = K^T dS^T (head dim x queries), with dS^T in shared memory as its B operand.
    S and dP span the whole head dim; dK and dV only columns offs_h (BLOCK_H wide, see _dkdv_program): split,
    S^T = K_h Q_h^T + K_r Q_r^T over this program's columns offs_h and the rest offs_r, so q_h and dO_h, the
    B operands of dK and dV, are also half of S's and dP's and each query tile is read once."""
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows_ok = offs_m < q_hi
        if MASK_QUERIES:
            rows_ok = rows_ok & real_keys(KeyMask, offs_m, rows_ok, True)
        check_rows = MASKED or MASK_QUERIES
        q_rows = q_base + offs_m[:, None] * stride_qs
        do_rows = do_base + offs_m[:, None] * stride_ds
        q_h = load_tile(q_rows + offs_h[None, :], rows_ok, offs_h, check_rows, HEAD_H, BLOCK_H)
        do_h = load_tile(do_rows + offs_h[None, :], rows_ok, offs_h, check_rows, HEAD_H, BLOCK_H)
        q_r = q_h
        do_r = do_h
        if BLOCK_H != BLOCK_D:  # the other columns of the head dim, for S and dP only
            q_r = load_tile(q_rows + offs_r[None, :], rows_ok, offs_r, check_rows, HEAD_H, BLOCK_H)
            do_r = load_tile(do_rows + offs_r[None, :], rows_ok, offs_r, check_rows, HEAD_H, BLOCK_H)
        lse, delta = _rows_lse_delta(Lse, Delta, lse_offset, offs_m, rows_ok)
        qk_t = mma(k, tl.trans(q_h), UPCAST, PRECISION)
        if BLOCK_H != BLOCK_D:
            qk_t += mma(k_rest, tl.trans(q_r), UPCAST, PRECISION)
        # Transposed tiles (keys x queries): P^T = exp2(S^T - lse).
        scores_t, tanh_t = capped_scores(qk_t, qk_scale, softcap_scale, SOFTCAP)
        p_t = tl.exp2(scores_t - lse[None, :])
        if MASKED:
            allowed_t = tl.trans(
                window_allowed(offs_m, offs_n, offset, window_left, window_right, WINDOW_LEFT, WINDOW_RIGHT)
            )
            allowed_t = allowed_t & key_ok[:, None] & rows_ok[None, :]
            p_t = tl.where(allowed_t, p_t, 0.0)
        dv += mma(convert(p_t, do_h.dtype, UPCAST), do_h, UPCAST, PRECISION)
        dp_t = mma(v, tl.trans(do_h), UPCAST, PRECISION)
        if BLOCK_H != BLOCK_D:
            dp_t += mma(v_rest, tl.trans(do_r), UPCAST, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - tanh_t * tanh_t)
        if MASKED:
            ds_t = tl.where(allowed_t, ds_t, 0.0)
        ds_low = convert(ds_t, q_h.dtype, UPCAST)
        if EXACT and MASKED and (WINDOW_LEFT or WINDOW_RIGHT):
            if any_nonfinite(q_h):
                dk = seen_product(
                    dk,
                    ds_t,
                    allowed_t,
                    q_base + start_m * stride_qs + offs_h,
                    stride_qs,
                    q_hi - start_m,
                    offs_h < HEAD_DIM,
                )
            else:
                dk += mma(ds_low, q_h, UPCAST, PRECISION)
        else:
            dk += mma(ds_low, q_h, UPCAST, PRECISION)
        if FUSED_DQ:
            if MASKED and (WINDOW_LEFT or WINDOW_RIGHT):
                if k_nonfinite:
                    dq = seen_product(
                        tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
                        tl.trans(ds_t),
                        tl.trans(allowed_t),
                        k_rows,
                        stride_ks,
                        keys_left,
                        offs_d < HEAD_DIM,
                    )
                    dq_t = tl.trans(dq)
                else:
                    dq_t = mma(tl.trans(k), ds_low, UPCAST, PRECISION)
            else:
                dq_t = mma(tl.trans(k), ds_low, UPCAST, PRECISION)
            _add_rows_t(dq_base, offs_m, stride_dqs, dq_t, rows_ok, offs_d, check_rows, HEAD_DIM, BLOCK_D)
    return dk, dv


@triton.jit
def _dkdv_group(
    k,
    v,
    k_rest,
    v_rest,
    key_ok,
    key_clean,
    k_nonfinite,
    offs_n,
    offs_d,
    offs_h,
    offs_r,
    Q,
    DOut,
    DQAccum,
    Lse,
    Delta,
    KeyMask,
    KeySpans,
    CuSeqlensQ,
    k_rows,
    num_spans,
    batch,
    kv_head,
    seqlen_q,
    key_first,
    key_last,
    k_len,
    offset,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_db,
    stride_ds,
    stride_dh,
    stride_dqb,
    stride_dqs,
    stride_dqh,
    stride_ks,
    stride_lb,
    stride_lh,
    window_left,
    window_right,
    qk_scale,
    softcap_scale,
    GROUP: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    MASK_QUERIES: tl.constexpr,
    FUSED_DQ: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_H: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    EXACT: tl.constexpr,
):
    """Unscaled (dK, dV) of one key tile over the queries of every head of its group that see it (and,
    FUSED_DQ, their dQ added to DQAccum). Per span, the query tiles every key of the tile sees run unmasked
    when key_clean; the window edges and the span's tail are masked. EXACT masks every tile (the redo)."""
    dk = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_H], dtype=tl.float32)
    keys_left = k_len - key_first
    for group_member in range(GROUP):
        head = kv_head * GROUP + group_member
        q_start, q_len = _bounds_again(CuSeqlensQ, batch, seqlen_q, IS_VARLEN)  # per head: not live across heads
        q_base = Q + batch.to(tl.int64) * stride_qb + q_start.to(tl.int64) * stride_qs + head * stride_qh
        do_base = DOut + batch.to(tl.int64) * stride_db + q_start.to(tl.int64) * stride_ds + head * stride_dh
        dq_base = DQAccum + batch.to(tl.int64) * stride_dqb + q_start.to(tl.int64) * stride_dqs + head * stride_dqh
        lse_offset = batch * stride_lb + head * stride_lh + q_start  # int32: frees the registers 16x128 needs packed
        for span in range(num_spans):
            q_lo, q_hi = span_bounds(KeySpans, span, q_len, MASK_QUERIES)
            # Rows that see some key of the tile, and those that see all of them (the window seen from a key).
            q_lo, q_hi, full_lo, full_hi = clip_to_window(
                q_lo, q_hi, key_first, key_last, -offset, window_right, window_left, WINDOW_RIGHT, WINDOW_LEFT
            )
            q_hi = tl.maximum(q_hi, q_lo)
            if EXACT:  # one masked range
                full_start = q_lo
                full_end = q_lo
            else:
                full_start = tl.minimum(q_lo + tl.cdiv(tl.maximum(full_lo - q_lo, 0), BLOCK_M) * BLOCK_M, q_hi)
                full_end = full_start + (tl.maximum(full_hi - full_start, 0) // BLOCK_M) * BLOCK_M
                full_end = tl.where(key_clean, full_end, full_start)
            if WINDOW_RIGHT:  # without a right window the rows before full_start see the whole tile
                dk, dv = _dkdv_tiles(
                    dk,
                    dv,
                    k,
                    v,
                    k_rest,
                    v_rest,
                    key_ok,
                    offs_n,
                    offs_d,
                    offs_h,
                    offs_r,
                    q_base,
                    do_base,
                    dq_base,
                    Lse,
                    Delta,
                    lse_offset,
                    KeyMask,
                    k_rows,
                    k_nonfinite,
                    q_lo,
                    full_start,
                    q_hi,
                    keys_left,
                    offset,
                    stride_qs,
                    stride_ds,
                    stride_dqs,
                    stride_ks,
                    window_left,
                    window_right,
                    qk_scale,
                    softcap_scale,
                    True,
                    MASK_QUERIES,
                    FUSED_DQ,
                    WINDOW_LEFT,
                    WINDOW_RIGHT,
                    SOFTCAP,
                    HEAD_DIM,
                    BLOCK_M,
                    BLOCK_D,
                    HEAD_H,
                    BLOCK_H,
                    UPCAST,
                    PRECISION,
                    EXACT,
                )
            dk, dv = _dkdv_tiles(
                dk,
                dv,
                k,
                v,
                k_rest,
                v_rest,
                key_ok,
                offs_n,
                offs_d,
                offs_h,
                offs_r,
                q_base,
                do_base,
                dq_base,
                Lse,
                Delta,
                lse_offset,
                KeyMask,
                k_rows,
                k_nonfinite,
                full_start,
                full_end,
                q_hi,
                keys_left,
                offset,
                stride_qs,
                stride_ds,
                stride_dqs,
                stride_ks,
                window_left,
                window_right,
                qk_scale,
                softcap_scale,
                False,
                MASK_QUERIES,
                FUSED_DQ,
                WINDOW_LEFT,
                WINDOW_RIGHT,
                SOFTCAP,
                HEAD_DIM,
                BLOCK_M,
                BLOCK_D,
                HEAD_H,
                BLOCK_H,
                UPCAST,
                PRECISION,
                EXACT,
            )
            dk, dv = _dkdv_tiles(
                dk,
                dv,
                k,
                v,
                k_rest,
                v_rest,
                key_ok,
                offs_n,
                offs_d,
                offs_h,
                offs_r,
                q_base,
                do_base,
                dq_base,
                Lse,
                Delta,
                lse_offset,
                KeyMask,
                k_rows,
                k_nonfinite,
                full_end,
                q_hi,
                q_hi,
                keys_left,
                offset,
                stride_qs,
                stride_ds,
                stride_dqs,
                stride_ks,
                window_left,
                window_right,
                qk_scale,
                softcap_scale,
                True,
                MASK_QUERIES,
                FUSED_DQ,
                WINDOW_LEFT,
                WINDOW_RIGHT,
                SOFTCAP,
                HEAD_DIM,
                BLOCK_M,
                BLOCK_D,
                HEAD_H,
                BLOCK_H,
                UPCAST,
                PRECISION,
                EXACT,
            )
    return dk, dv


@triton.jit
def _bounds_again(CuSeqlens, batch, seq_len, IS_VARLEN: tl.constexpr):
    """(start, len) of sequence `batch` read again where they are used (volatile loads, which the compiler does
    not merge with the first read): kept live through the query loops instead, they spilled packed."""
    if IS_VARLEN:
        start = tl.load(CuSeqlens + batch, volatile=True)
        seq_len = tl.load(CuSeqlens + batch + 1, volatile=True) - start
    else:
        start = 0
    return start, seq_len


@triton.jit
def _dkdv_program(
    Q,
    K,
    V,
    DOut,
    DK,
    DV,
    DQAccum,
    Lse,
    Delta,
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
    stride_db,
    stride_ds,
    stride_dh,
    stride_dkb,
    stride_dks,
    stride_dkh,
    stride_dvb,
    stride_dvs,
    stride_dvh,
    stride_dqb,
    stride_dqs,
    stride_dqh,
    stride_lb,
    stride_lh,
    stride_mb,
    stride_sb,
    seqlen_q,
    seqlen_k,
    window_left,
    window_right,
    qk_scale,
    softcap_scale,
    sm_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_QUERIES: tl.constexpr,
    FUSED_DQ: tl.constexpr,
    WINDOW_LEFT: tl.constexpr,
    WINDOW_RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_D: tl.constexpr,
):
    """One key tile of one KV head: its dK and dV stored, and (FUSED_DQ) its share of dQ added to DQAccum.

    SPLIT_D programs share a key tile (adjacent in the grid's first axis), each accumulating and storing
    1 / SPLIT_D of the dK and dV columns (BLOCK_H of them) while computing S and dP over the whole head dim:
    at head dim 256 the two 64-key x 256 fp32 accumulators alone would fill the 128 registers per thread that
    8 warps leave, and 64 keys are the rows wgmma needs. K and V come in as two half tiles, this program's
    columns (k, v) and the other half's (k_rest, v_rest): every tile then has one layout and one set of row
    addresses, which keeps the dense and packed launches spill-free (full-width q and dO tiles beside the half
    ones, read twice, spilled 104-128 bytes there). SPLIT_D is 1 or 2."""
    tl.static_assert(SPLIT_D <= 2, "the dK/dV kernel splits the head dim in two halves at most")
    BLOCK_H: tl.constexpr = BLOCK_D // SPLIT_D
    HEAD_H: tl.constexpr = BLOCK_H if HEAD_DIM == BLOCK_D else HEAD_DIM  # column masks only for padded dims
    pid_n = tl.program_id(0) // SPLIT_D
    split = tl.program_id(0) % SPLIT_D
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    _, q_len, k_start, k_len = sequence_bounds(CuSeqlensQ, CuSeqlensK, batch, seqlen_q, seqlen_k, IS_VARLEN)
    key_first = pid_n * BLOCK_N
    if key_first >= k_len:
        return
    offs_n = key_first + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h = split * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = (1 - split) * BLOCK_H + tl.arange(0, BLOCK_H)  # the other half's columns (unused at SPLIT_D 1)
    keys_in = offs_n < k_len
    key_ok = keys_in
    KeyMask += batch.to(tl.int64) * stride_mb
    KeySpans += batch.to(tl.int64) * stride_sb
    if HAS_MASK:
        key_ok = keys_in & real_keys(KeyMask, offs_n, keys_in, True)
    # Queries are walked span by span: the key spans when queries are masked too, else [0, q_len).
    num_spans = span_count(NumSpans, batch, MASK_QUERIES)
    if tl.max(key_ok.to(tl.int32), axis=0) == 0:
        num_spans = 0
    offset = k_len - q_len
    key_last = tl.minimum(key_first + BLOCK_N, k_len) - 1

    # Scalar 64-bit tile bases and int32 row offsets: 64-bit row addresses live across the query loops spilled.
    tile_token = (k_start + key_first).to(tl.int64)
    key_rows = tl.arange(0, BLOCK_N)[:, None]
    K += batch.to(tl.int64) * stride_kb + kv_head * stride_kh
    k_keys = K + tile_token * stride_ks + key_rows * stride_ks
    v_keys = V + batch.to(tl.int64) * stride_vb + tile_token * stride_vs + kv_head * stride_vh + key_rows * stride_vs
    k = load_tile(k_keys + offs_h[None, :], key_ok, offs_h, True, HEAD_H, BLOCK_H)
    v = load_tile(v_keys + offs_h[None, :], key_ok, offs_h, True, HEAD_H, BLOCK_H)
    k_nonfinite = any_nonfinite(k)
    v_nonfinite = any_nonfinite(v)
    k_rest = k
    v_rest = v
    if SPLIT_D > 1:
        k_rest = load_tile(k_keys + offs_r[None, :], key_ok, offs_r, True, HEAD_H, BLOCK_H)
        v_rest = load_tile(v_keys + offs_r[None, :], key_ok, offs_r, True, HEAD_H, BLOCK_H)
        k_nonfinite = k_nonfinite | any_nonfinite(k_rest)
        v_nonfinite = v_nonfinite | any_nonfinite(v_rest)
    # A full key tile (every key real, K and V finite) lets the query tiles inside the window and span skip masks.
    key_clean = (tl.min(key_ok.to(tl.int32), axis=0) > 0) & ~(k_nonfinite | v_nonfinite)
    k_rows = K + tile_token * stride_ks + offs_d
    dk, dv = _dkdv_group(
        k,
        v,
        k_rest,
        v_rest,
        key_ok,
        key_clean,
        k_nonfinite,
        offs_n,
        offs_d,
        offs_h,
        offs_r,
        Q,
        DOut,
        DQAccum,
        Lse,
        Delta,
        KeyMask,
        KeySpans,
        CuSeqlensQ,
        k_rows,
        num_spans,
        batch,
        kv_head,
        seqlen_q,
        key_first,
        key_last,
        k_len,
        offset,
        stride_qb,
        stride_qs,
        stride_qh,
        stride_db,
        stride_ds,
        stride_dh,
        stride_dqb,
        stride_dqs,
        stride_dqh,
        stride_ks,
        stride_lb,
        stride_lh,
        window_left,
        window_right,
        qk_scale,
        softcap_scale,
        GROUP,
        IS_VARLEN,
        MASK_QUERIES,
        FUSED_DQ,
        WINDOW_LEFT,
        WINDOW_RIGHT,
        SOFTCAP,
        HEAD_DIM,
        BLOCK_M,
        BLOCK_D,
        HEAD_H,
        BLOCK_H,
        BLOCK_N,
        UPCAST,
        PRECISION,
        False,
    )
    batch = program_id_again(2, UPCAST)
    kv_head = program_id_again(1, UPCAST)
    key_first = program_id_again(0, UPCAST) // SPLIT_D * BLOCK_N
    k_start, k_len = _bounds_again(CuSeqlensK, batch, seqlen_k, IS_VARLEN)
    tile_token = (k_start + key_first).to(tl.int64)
    DK += batch.to(tl.int64) * stride_dkb + tile_token * stride_dks + kv_head * stride_dkh
    DV += batch.to(tl.int64) * stride_dvb + tile_token * stride_dvs + kv_head * stride_dvh
    key_rows = tl.arange(0, BLOCK_N)  # recomputed here, not kept live through the loops
    keys_in = key_rows < k_len - key_first
    if WINDOW_LEFT or WINDOW_RIGHT:
        # A non-finite q of a row that does not see some of these keys (a window edge) reaches their dK as
        # 0 * NaN and stays non-finite to the end. Rare: then redo dK and dV exactly (dQ is already right).
        if any_nonfinite(dk):
            dk, dv = _dkdv_group(
                k,
                v,
                k_rest,
                v_rest,
                key_ok,
                key_clean,
                k_nonfinite,
                offs_n,
                offs_d,
                offs_h,
                offs_r,
                Q,
                DOut,
                DQAccum,
                Lse,
                Delta,
                KeyMask,
                KeySpans,
                CuSeqlensQ,
                k_rows,
                num_spans,
                batch,
                kv_head,
                seqlen_q,
                key_first,
                key_last,
                k_len,
                offset,
                stride_qb,
                stride_qs,
                stride_qh,
                stride_db,
                stride_ds,
                stride_dh,
                stride_dqb,
                stride_dqs,
                stride_dqh,
                stride_ks,
                stride_lb,
                stride_lh,
                window_left,
                window_right,
                qk_scale,
                softcap_scale,
                GROUP,
                IS_VARLEN,
                MASK_QUERIES,
                False,
                WINDOW_LEFT,
                WINDOW_RIGHT,
                SOFTCAP,
                HEAD_DIM,
                BLOCK_M,
                BLOCK_D,
                HEAD_H,
                BLOCK_H,
                BLOCK_N,
                UPCAST,
                PRECISION,
                True,
            )
            _store_rows(DK, key_rows[:, None], stride_dks, dk * sm_scale, keys_in, offs_h, HEAD_H, BLOCK_H, UPCAST)
            _store_rows(DV, key_rows[:, None], stride_dvs, dv, keys_in, offs_h, HEAD_H, BLOCK_H, UPCAST)
        else:
            _store_rows(DK, key_rows[:, None], stride_dks, dk * sm_scale, keys_in, offs_h, HEAD_H, BLOCK_H, UPCAST)
            _store_rows(DV, key_rows[:, None], stride_dvs, dv, keys_in, offs_h, HEAD_H, BLOCK_H, UPCAST)
    else:
        _store_rows(DK, key_rows[:, None], stride_dks, dk * sm_scale, keys_in, offs_h, HEAD_H, BLOCK_H, UPCAST)
        _store_rows(DV, key_rows[:, None], stride_dvs, dv, keys_in, offs_h, HEAD_H, BLOCK_H, UPCAST)


@triton.autotune(key=_BWD_KEY, reset_to_zero=["DQAccum"], **autotuned(BWD_TILES))
@triton.jit
def attention_bwd_kernel(
    Q,
    K,
    V,
    DOut,
    DK,
    DV,
    DQAccum,
    Lse,
    Delta,
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
    stride_db,
    stride_ds,
    stride_dh,
    stride_dkb,
    stride_dks,
    stride_dkh,
    stride_dvb,
    stride_dvs,
    stride_dvh,
    stride_dqb,
    stride_dqs,
    stride_dqh,
    stride_lb,
    stride_lh,
    stride_mb,
    stride_sb,
    seqlen_q,
    seqlen_k,
    window_left,
    window_right,
    qk_scale,
    softcap_scale,
    sm_scale,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The default backward: dK, dV stored, dQ (unscaled, fp32) added to the zeroed DQAccum; 5 GEMMs per pair."""
    _dkdv_program(
        Q,
        K,
        V,
        DOut,
        DK,
        DV,
        DQAccum,
        Lse,
        Delta,
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
        stride_db,
        stride_ds,
        stride_dh,
        stride_dkb,
        stride_dks,
        stride_dkh,
        stride_dvb,
        stride_dvs,
        stride_dvh,
        stride_dqb,
        stride_dqs,
        stride_dqh,
        stride_lb,
        stride_lh,
        stride_mb,
        stride_sb,
        seqlen_q,
        seqlen_k,
        window_left,
        window_right,
        qk_scale,
        softcap_scale,
        sm_scale,
        GROUP,
        HEAD_DIM,
        BLOCK_D,
        IS_VARLEN,
        HAS_MASK,
        MASK_QUERIES,
        True,
        WINDOW_LEFT,
        WINDOW_RIGHT,
        SOFTCAP,
        UPCAST,
        PRECISION,
        BLOCK_M,
        BLOCK_N,
        1,
    )


@triton.autotune(key=_BWD_KEY, **autotuned(DKDV_TILES, ampere_table=DKDV_AMPERE_TILES))
@triton.jit
def attention_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DOut,
    DK,
    DV,
    Lse,
    Delta,
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
    stride_db,
    stride_ds,
    stride_dh,
    stride_dkb,
    stride_dks,
    stride_dkh,
    stride_dvb,
    stride_dvs,
    stride_dvh,
    stride_lb,
    stride_lh,
    stride_mb,
    stride_sb,
    seqlen_q,
    seqlen_k,
    window_left,
    window_right,
    qk_scale,
    softcap_scale,
    sm_scale,
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
    SPLIT_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The deterministic backward's dK and dV (dQ comes from attention_bwd_dq_kernel); SPLIT_D programs per
    key tile, see dkdv_split."""
    _dkdv_program(
        Q,
        K,
        V,
        DOut,
        DK,
        DV,
        DK,
        Lse,
        Delta,
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
        stride_db,
        stride_ds,
        stride_dh,
        stride_dkb,
        stride_dks,
        stride_dkh,
        stride_dvb,
        stride_dvs,
        stride_dvh,
        0,
        0,
        0,
        stride_lb,
        stride_lh,
        stride_mb,
        stride_sb,
        seqlen_q,
        seqlen_k,
        window_left,
        window_right,
        qk_scale,
        softcap_scale,
        sm_scale,
        GROUP,
        HEAD_DIM,
        BLOCK_D,
        IS_VARLEN,
        HAS_MASK,
        MASK_QUERIES,
        False,
        WINDOW_LEFT,
        WINDOW_RIGHT,
        SOFTCAP,
        UPCAST,
        PRECISION,
        BLOCK_M,
        BLOCK_N,
        SPLIT_D,
    )


@triton.jit
def _dq_tiles(
    dq,
    q,
    do,
    lse,
    delta,
    K,
    V,
    KeyMask,
    start,
    end,
    offs_m,
    offs_d,
    offset,
    rows_ok,
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
):
    """Fold key tiles [start, end) into dQ. MASKED selects pairs by window, bounds and padding; unmasked tiles
    hold real keys every row of the block sees (rows outside the sequence are zeroed by the caller).
    EXACT (the slow redo of windowed blocks) keeps a non-finite K of a key out of the rows that do not see it."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_ok = offs_n < end
        if HAS_MASK:
            key_ok = key_ok & real_keys(KeyMask, offs_n, key_ok, True)
        k = load_tile(K + offs_n[:, None] * stride_ks + offs_d[None, :], key_ok, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        v = load_tile(V + offs_n[:, None] * stride_vs + offs_d[None, :], key_ok, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        scores, tanh_s = capped_scores(mma(q, tl.trans(k), UPCAST, PRECISION), qk_scale, softcap_scale, SOFTCAP)
        p = tl.exp2(scores - lse[:, None])
        if MASKED:
            allowed = window_allowed(offs_m, offs_n, offset, window_left, window_right, WINDOW_LEFT, WINDOW_RIGHT)
            allowed = allowed & rows_ok[:, None] & key_ok[None, :]
            p = tl.where(allowed, p, 0.0)
        dp = mma(do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - tanh_s * tanh_s)
        if MASKED:
            ds = tl.where(allowed, ds, 0.0)
        if EXACT and MASKED and (WINDOW_LEFT or WINDOW_RIGHT):
            if any_nonfinite(k):
                dq = seen_product(
                    dq, ds, allowed, K + start_n * stride_ks + offs_d, stride_ks, end - start_n, offs_d < HEAD_DIM
                )
            else:
                dq += mma(convert(ds, k.dtype, UPCAST), k, UPCAST, PRECISION)
        else:
            dq += mma(convert(ds, k.dtype, UPCAST), k, UPCAST, PRECISION)
    return dq


@triton.jit
def _dq_spans(
    q,
    do,
    lse,
    delta,
    K,
    V,
    KeyMask,
    KeySpans,
    num_spans,
    k_len,
    row_first,
    row_last,
    offs_m,
    offs_d,
    offset,
    rows_ok,
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
):
    """Unscaled dQ of one query block over every key it sees. Without a key mask, the key tiles every row of
    the block sees run unmasked; window edges and the span's tail are masked (every tile with a mask, whose
    holes need it, and in the EXACT redo)."""
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for span in range(num_spans):
        lo, hi = span_bounds(KeySpans, span, k_len, HAS_MASK)
        lo, hi, full_lo, full_hi = clip_to_window(
            lo, hi, row_first, row_last, offset, window_left, window_right, WINDOW_LEFT, WINDOW_RIGHT
        )
        hi = tl.maximum(hi, lo)
        if EXACT or HAS_MASK:
            full_start = lo
            full_end = lo
        else:
            full_start = tl.minimum(lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_N) * BLOCK_N, hi)
            full_end = full_start + (tl.maximum(full_hi - full_start, 0) // BLOCK_N) * BLOCK_N
        if WINDOW_LEFT:  # without a left window the span starts with full tiles
            dq = _dq_tiles(
                dq,
                q,
                do,
                lse,
                delta,
                K,
                V,
                KeyMask,
                lo,
                full_start,
                offs_m,
                offs_d,
                offset,
                rows_ok,
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
                EXACT,
            )
        dq = _dq_tiles(
            dq,
            q,
            do,
            lse,
            delta,
            K,
            V,
            KeyMask,
            full_start,
            full_end,
            offs_m,
            offs_d,
            offset,
            rows_ok,
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
            EXACT,
        )
        dq = _dq_tiles(
            dq,
            q,
            do,
            lse,
            delta,
            K,
            V,
            KeyMask,
            full_end,
            hi,
            offs_m,
            offs_d,
            offset,
            rows_ok,
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
            EXACT,
        )
    return tl.where(rows_ok[:, None], dq, 0.0)  # a row that sees no key: 0, even where a k is non-finite


@triton.autotune(key=_BWD_KEY, **autotuned(DQ_TILES))
@triton.jit
def attention_bwd_dq_kernel(
    Q,
    K,
    V,
    DOut,
    DQ,
    Lse,
    Delta,
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
    stride_db,
    stride_ds,
    stride_dh,
    stride_dqb,
    stride_dqs,
    stride_dqh,
    stride_lb,
    stride_lh,
    stride_mb,
    stride_sb,
    seqlen_q,
    seqlen_k,
    window_left,
    window_right,
    qk_scale,
    softcap_scale,
    sm_scale,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    q_start, q_len, k_start, k_len = sequence_bounds(CuSeqlensQ, CuSeqlensK, batch, seqlen_q, seqlen_k, IS_VARLEN)
    row_first = pid_m * BLOCK_M
    if row_first >= q_len:
        return
    kv_head = head // GROUP
    offs_m = row_first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    KeyMask += batch.to(tl.int64) * stride_mb
    KeySpans += batch.to(tl.int64) * stride_sb
    rows_in, rows_ok, num_spans = query_rows(KeyMask, NumSpans, batch, offs_m, q_len, HAS_MASK, MASK_QUERIES)
    offset = k_len - q_len
    row_last = tl.minimum(row_first + BLOCK_M, q_len) - 1

    q_tokens = (q_start + offs_m).to(tl.int64)[:, None]
    q = load_tile(
        Q + batch.to(tl.int64) * stride_qb + q_tokens * stride_qs + head * stride_qh + offs_d[None, :],
        rows_ok,
        offs_d,
        True,
        HEAD_DIM,
        BLOCK_D,
    )
    do = load_tile(
        DOut + batch.to(tl.int64) * stride_db + q_tokens * stride_ds + head * stride_dh + offs_d[None, :],
        rows_ok,
        offs_d,
        True,
        HEAD_DIM,
        BLOCK_D,
    )
    lse_offset = batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start
    lse, delta = _rows_lse_delta(Lse, Delta, lse_offset, offs_m, rows_ok)
    K += batch.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_ks + kv_head * stride_kh
    V += batch.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vs + kv_head * stride_vh
    dq = _dq_spans(
        q,
        do,
        lse,
        delta,
        K,
        V,
        KeyMask,
        KeySpans,
        num_spans,
        k_len,
        row_first,
        row_last,
        offs_m,
        offs_d,
        offset,
        rows_ok,
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
    )
    DQ += batch.to(tl.int64) * stride_dqb + head * stride_dqh
    if WINDOW_LEFT or WINDOW_RIGHT:
        # A non-finite K of a key a row does not see (a window edge) reaches its dQ as 0 * NaN and stays
        # non-finite to the end. Rare: then redo the block exactly (each branch stores its own result).
        if any_nonfinite(dq):
            dq = _dq_spans(
                q,
                do,
                lse,
                delta,
                K,
                V,
                KeyMask,
                KeySpans,
                num_spans,
                k_len,
                row_first,
                row_last,
                offs_m,
                offs_d,
                offset,
                rows_ok,
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
            )
            _store_rows(DQ, q_tokens, stride_dqs, dq * sm_scale, rows_in, offs_d, HEAD_DIM, BLOCK_D, UPCAST)
        else:
            _store_rows(DQ, q_tokens, stride_dqs, dq * sm_scale, rows_in, offs_d, HEAD_DIM, BLOCK_D, UPCAST)
    else:
        _store_rows(DQ, q_tokens, stride_dqs, dq * sm_scale, rows_in, offs_d, HEAD_DIM, BLOCK_D, UPCAST)


def _dlse_strides(dlse: torch.Tensor | None, is_varlen: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides of the log-sum-exp gradient: (B, H, S) padded, (H, T) packed."""
    if dlse is None:
        return 0, 0, 0
    return (0, *dlse.stride()) if is_varlen else dlse.stride()


def _finish_dq(dq_sum: torch.Tensor, softmax_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The fused kernel's fp32 dQ sum scaled and cast in place of a store: non-finite results as NaN."""
    dq_sum.mul_(softmax_scale)
    return dq_sum.masked_fill_(dq_sum.isinf(), float("nan")).to(dtype)


def dkdv_split(block_d: int) -> int:
    """Programs per key tile of the dK/dV kernel, each owning a slice of the head dim: two at head dim 256,
    so that its 64-key tiles fit in registers (see _dkdv_program)."""
    return 2 if block_d > 128 else 1


def _fused(q: torch.Tensor, options, block_d: int) -> bool:
    """Whether the fused kernel runs: unless asked to be deterministic, for head dims up to 128, on sm_90+ for
    16-bit inputs, and in the interpreter (which tests it at every dtype). Ampere, head dim 256 and fp32 on a
    GPU keep the pair, whose tiles are spill-free there (the fused kernel's five accumulators spill on sm_80,
    at head dim 256, and at fp32 in the dense and packed layouts)."""
    if options.deterministic or block_d > 128:
        return False
    if q.device.type != "cuda":
        return True
    return q.dtype != torch.float32 and torch.cuda.get_device_capability(q.device)[0] >= 9


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dlse: torch.Tensor | None,
    layout,
    options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the preprocess and the fused kernel (or, options.deterministic, the dK/dV and dQ kernels) on an
    ``llm2vec_fast`` AttentionLayout and AttentionOptions (as the forward); returns contiguous (dq, dk, dv).

    dlse is read with whatever strides it has; q, k, v, out and dout need a unit last stride (the
    all-zero-stride dout of ``out.sum()`` costs one head-dim row, see unit_last_stride) and lse a
    contiguous layout (what the forward returns; anything else is copied)."""
    q, k, v, out, dout = (unit_last_stride(t) for t in (q, k, v, out, dout))
    lse = lse.contiguous()
    shape = launch_shape(q, k, layout, options)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0 or shape.seqlen_q == 0 or shape.seqlen_k == 0:
        return torch.zeros_like(q, memory_format=torch.contiguous_format), dk.zero_(), dv.zero_()
    heads_q, heads_kv, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    is_varlen = shape.is_varlen
    delta = torch.empty_like(lse)
    placeholder = q
    block_d = triton.next_power_of_2(head_dim)
    masks = mask_args(shape, layout, placeholder)
    dout_strides = token_strides(dout, is_varlen)
    attention_bwd_preprocess_kernel[(triton.cdiv(shape.seqlen_q, _PREPROCESS_BLOCK_M), heads_q, shape.batch)](
        out,
        dout,
        placeholder if dlse is None else dlse,
        delta,
        masks[3],  # masks[3]: CuSeqlensQ
        *token_strides(out, is_varlen),
        *dout_strides,
        *lse_strides(lse, is_varlen),
        *_dlse_strides(dlse, is_varlen),
        shape.seqlen_q,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        IS_VARLEN=is_varlen,
        HAS_DLSE=dlse is not None,
        BLOCK_M=_PREPROCESS_BLOCK_M,
    )
    softcap, softmax_scale = options.softcap, options.softmax_scale
    qk_scale, softcap_scale = score_scales(softmax_scale, softcap)
    common_strides = (
        *token_strides(q, is_varlen),
        *token_strides(k, is_varlen),
        *token_strides(v, is_varlen),
        *dout_strides,
    )
    common_scalars = (
        shape.seqlen_q,
        shape.seqlen_k,
        shape.window_left,
        shape.window_right,
        qk_scale,
        softcap_scale,
        softmax_scale,
    )
    flags = dict(
        GROUP=heads_q // heads_kv,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        IS_VARLEN=is_varlen,
        HAS_MASK=shape.key_mask is not None,
        MASK_QUERIES=shape.mask_queries,
        WINDOW_LEFT=shape.window_left >= 0,
        WINDOW_RIGHT=shape.window_right >= 0,
        SOFTCAP=softcap > 0,
        UPCAST=INTERPRETING,
        PRECISION=dot_precision(q.dtype),
    )

    def kv_grid(meta, splits=1):
        return triton.cdiv(shape.seqlen_k, meta["BLOCK_N"]) * splits, heads_kv, shape.batch

    key_args = (*masks, *common_strides, *token_strides(dk, is_varlen), *token_strides(dv, is_varlen))
    tail_args = (*lse_strides(lse, is_varlen), shape.stride_mask, shape.stride_spans, *common_scalars)
    if _fused(q, options, block_d):
        dq_sum = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        attention_bwd_kernel[kv_grid](
            q,
            k,
            v,
            dout,
            dk,
            dv,
            dq_sum,
            lse,
            delta,
            *key_args,
            *token_strides(dq_sum, is_varlen),
            *tail_args,
            seqlen_bucket(shape.seqlen_k),
            **flags,
        )
        return _finish_dq(dq_sum, softmax_scale, q.dtype), dk, dv
    split = dkdv_split(block_d)
    attention_bwd_dkdv_kernel[lambda meta: kv_grid(meta, split)](
        q, k, v, dout, dk, dv, lse, delta, *key_args, *tail_args, seqlen_bucket(shape.seqlen_k), **flags, SPLIT_D=split
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    attention_bwd_dq_kernel[lambda meta: (triton.cdiv(shape.seqlen_q, meta["BLOCK_M"]), heads_q, shape.batch)](
        q,
        k,
        v,
        dout,
        dq,
        lse,
        delta,
        *masks,
        *common_strides,
        *token_strides(dq, is_varlen),
        *lse_strides(lse, is_varlen),
        shape.stride_mask,
        shape.stride_spans,
        *common_scalars,
        seqlen_bucket(shape.seqlen_q),
        **flags,
    )
    return dq, dk, dv
