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
    launch_shape,
    mask_args,
    seqlen_bucket,
    unit_last_stride,
)
from .tiles import (
    capped_scores,
    clip_to_window,
    convert,
    load_tile,
    mma,
    query_rows,
    real_keys,
    sequence_bounds,
    span_bounds,
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
def _attend_tiles(
    acc,
    l_i,
    m_i,
    q,
    K,
    V,
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
):
    """Fold keys [start, end) into (acc, l_i, m_i); MASKED applies window, bound and padding masks. V of
    padding keys is never loaded (in fp32 full tiles it is: see the redo). EXACT (MASKED tiles only) also
    keeps non-finite V of keys that only some rows see away from the others (slow path)."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        k = load_tile(K + offs_n[:, None] * stride_ks + offs_d[None, :], n_ok, offs_d, MASKED, HEAD_DIM, BLOCK_D)
        scores, _ = capped_scores(mma(q, tl.trans(k), UPCAST, PRECISION), qk_scale, softcap_scale, SOFTCAP)
        keys_ok = n_ok  # keys that are real and inside the span: V of the others is never loaded
        if HAS_MASK:
            keys_ok = keys_ok & real_keys(KeyMask, offs_n, n_ok, MASKED)
        allowed = keys_ok[None, :]
        if MASKED:
            allowed = allowed & window_allowed(
                offs_m, offs_n, offset, window_left, window_right, WINDOW_LEFT, WINDOW_RIGHT
            )
        if MASKED or HAS_MASK:
            scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        if MASKED or HAS_MASK:  # a row may have seen no key yet: keep exp2 away from -inf - -inf
            m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_base = m_new
        p = tl.exp2(scores - m_base[:, None])
        alpha = tl.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, axis=1)
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
):
    """(acc, l_i, m_i) of one query block over every span of keys it may see. EXACT: every tile masked,
    so that no non-finite value of a key a row does not see can reach it (the slow redo)."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
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
            )
        else:
            full_start = tl.minimum(lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_N) * BLOCK_N, hi)
            full_end = full_start + (tl.maximum(full_hi - full_start, 0) // BLOCK_N) * BLOCK_N
            if WINDOW_LEFT:  # without a left window the span starts with full tiles
                acc, l_i, m_i = _attend_tiles(
                    acc,
                    l_i,
                    m_i,
                    q,
                    K,
                    V,
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
                )
            acc, l_i, m_i = _attend_tiles(
                acc,
                l_i,
                m_i,
                q,
                K,
                V,
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
            )
            acc, l_i, m_i = _attend_tiles(
                acc,
                l_i,
                m_i,
                q,
                K,
                V,
                KeyMask,
                full_end,
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
            )
    return acc, l_i, m_i


FWD_TILES = {
    "half": [(128, 128, 8, 2), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 2)],
    "half_wide": [(128, 64, 8, 2), (32, 64, 4, 2), (16, 64, 4, 2)],
    "fp32": [(32, 64, 8, 2), (16, 64, 4, 2), (16, 32, 8, 2)],
}


@triton.autotune(
    key=["SEQLEN_BUCKET", "HEAD_DIM", "GROUP", "IS_VARLEN", "HAS_MASK", "WINDOW_LEFT", "WINDOW_RIGHT", "SOFTCAP"],
    **autotuned(FWD_TILES),
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
    rows_in, rows_real, num_spans = query_rows(KeyMask, NumSpans, batch, offs_m, q_len, HAS_MASK, MASK_QUERIES)

    q = load_tile(
        Q
        + batch.to(tl.int64) * stride_qb
        + (q_start + offs_m).to(tl.int64)[:, None] * stride_qs
        + head * stride_qh
        + offs_d[None, :],
        rows_in,
        offs_d,
        True,
        HEAD_DIM,
        BLOCK_D,
    )
    K += batch.to(tl.int64) * stride_kb + k_start.to(tl.int64) * stride_ks + kv_head * stride_kh
    V += batch.to(tl.int64) * stride_vb + k_start.to(tl.int64) * stride_vs + kv_head * stride_vh
    offset = k_len - q_len
    row_last = tl.minimum(row_first + BLOCK_M, q_len) - 1
    acc, l_i, m_i = _attend_spans(
        q,
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
    Out += batch.to(tl.int64) * stride_ob + q_start.to(tl.int64) * stride_os + head * stride_oh
    Lse += batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + q_start
    if WINDOW_LEFT or WINDOW_RIGHT or (HAS_MASK and V.dtype.element_ty == tl.float32):
        # A non-finite V of a key a row does not see (at a window edge; for fp32, whose full tiles load V
        # unmasked to stay spill-free, also padding) reaches it as 0 * NaN and stays non-finite in acc to
        # the end. Rare: then redo the block exactly. (Each
        # branch stores its own result, so the first pass's registers are free during the redo.)
        if any_nonfinite(acc):
            acc, l_i, m_i = _attend_spans(
                q,
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
            _store_block(
                acc, l_i, m_i, rows_in, rows_real, Out, Lse, offs_m, offs_d, stride_os, HEAD_DIM, BLOCK_D, UPCAST
            )
        else:
            _store_block(
                acc, l_i, m_i, rows_in, rows_real, Out, Lse, offs_m, offs_d, stride_os, HEAD_DIM, BLOCK_D, UPCAST
            )
    else:
        _store_block(acc, l_i, m_i, rows_in, rows_real, Out, Lse, offs_m, offs_d, stride_os, HEAD_DIM, BLOCK_D, UPCAST)


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
    stride_os,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Normalise and store a query block. l_i is 0 exactly on rows that saw no key or only -inf scores
    (zeros, lse = -inf) and NaN on rows with a NaN or +inf score (NaN out and lse)."""
    row_ok = rows_real & (l_i != 0)
    l_safe = tl.where(row_ok, l_i, 1.0)
    out = tl.where(row_ok[:, None], nan_if_infinite(acc / l_safe[:, None]), 0.0)
    lse = tl.where(row_ok, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(
        Out + offs_m.to(tl.int64)[:, None] * stride_os + offs_d[None, :],
        convert(out, Out.dtype.element_ty, UPCAST),
        mask=tile_mask(rows_in, offs_d, HEAD_DIM, BLOCK_D),
    )
    tl.store(Lse + offs_m, lse, mask=rows_in)


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
    AttentionOptions; returns (out like q, float32 lse (B, Hq, Sq) or (Hq, Tq))."""
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    shape = launch_shape(q, k, layout, options)
    heads_q, head_dim = q.shape[-2], q.shape[-1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(layout.lse_shape(q), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or shape.seqlen_q == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    softcap = options.softcap
    qk_scale, softcap_scale = score_scales(options.softmax_scale, softcap)
    grid = lambda meta: (triton.cdiv(shape.seqlen_q, meta["BLOCK_M"]), heads_q, shape.batch)  # noqa: E731
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
        shape.window_left,
        shape.window_right,
        qk_scale,
        softcap_scale,
        seqlen_bucket(shape.seqlen_q),
        GROUP=heads_q // k.shape[-2],
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
    )
    return out, lse
