// Where a block's sequence lives and which of its tiles can see each other: sequence slices,
// window bounds, and the key-padding bits that let a block skip fully padded tiles.
#pragma once

#include <cstdint>

#include "params.h"
#include "ptx.cuh"

namespace l2vf {

__host__ __device__ __forceinline__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// One sequence of the batch: its lengths and the index of its first token in the token
// dimension (varlen) or 0 (padded layout; the batch stride then selects the sequence).
struct SeqSlice {
  int len_q, len_k;
  int q_token0, k_token0;
  int offset;  // len_k - len_q: query i's aligned key position is i + offset (bottom-right)
};

__device__ __forceinline__ SeqSlice seq_slice(const AttnParams& p, int b) {
  SeqSlice s;
  if (p.cu_seqlens_q != nullptr) {
    s.q_token0 = ld_global_i32(p.cu_seqlens_q + b);
    s.k_token0 = ld_global_i32(p.cu_seqlens_k + b);
    s.len_q = ld_global_i32(p.cu_seqlens_q + b + 1) - s.q_token0;
    s.len_k = ld_global_i32(p.cu_seqlens_k + b + 1) - s.k_token0;
  } else {
    s.q_token0 = 0;
    s.k_token0 = 0;
    s.len_q = p.seqlen_q;
    s.len_k = p.seqlen_k;
  }
  s.offset = s.len_k - s.len_q;
  return s;
}

// Element offset of token `token` of sequence b, head h, in a tensor with these strides.
__device__ __forceinline__ int64_t token_offset(int64_t batch_stride, int64_t row_stride, int64_t head_stride,
                                                int b, int token, int h) {
  return b * batch_stride + static_cast<int64_t>(token) * row_stride + h * head_stride;
}

// Index of token 0 of sequence b, head h, in an lse-shaped float buffer.
__device__ __forceinline__ int64_t lse_offset(const AttnParams& p, int b, int h, int token0) {
  return b * p.lse_batch_stride + h * p.lse_head_stride + token0;
}

// Keys [n_lo, n_hi) visible from some query in [m0, m0 + rows) (rows >= 1); empty when n_hi <= n_lo.
__device__ __forceinline__ void visible_keys(const AttnParams& p, const SeqSlice& s, int m0, int rows, int& n_lo,
                                             int& n_hi) {
  n_lo = max(0, m0 + s.offset - p.window_left);
  n_hi = min(s.len_k, m0 + rows - 1 + s.offset + p.window_right + 1);
}

// Queries [m_lo, m_hi) that see some key in [n0, n0 + cols) (cols >= 1).
__device__ __forceinline__ void visible_queries(const AttnParams& p, const SeqSlice& s, int n0, int cols, int& m_lo,
                                                int& m_hi) {
  m_lo = max(0, n0 - s.offset - p.window_right);
  m_hi = min(s.len_q, n0 + cols - 1 - s.offset + p.window_left + 1);
}

// Whether every query in [m0, m0 + rows) sees every key in [n0, n0 + cols) as far as the window
// goes (padding and sequence ends aside): then no element of that tile needs the window test.
__device__ __forceinline__ bool window_covers_tile(const AttnParams& p, const SeqSlice& s, int m0, int rows, int n0,
                                                   int cols) {
  return m0 + rows - 1 + s.offset - p.window_left <= n0 && n0 + cols - 1 <= m0 + s.offset + p.window_right;
}

// Whether key j is within query i's window.
__device__ __forceinline__ bool in_window(const AttnParams& p, const SeqSlice& s, int i, int j) {
  return j >= i + s.offset - p.window_left && j <= i + s.offset + p.window_right;
}

// Validity bits of the kTile positions [t0, t0 + kTile) of one row of packed mask bits
// (t0 a multiple of kTile, kTile a multiple of 32 dividing 128), limited to positions < len.
// Without a mask (row == nullptr) only the length limits.
template <int kTile>
struct TileBits {
  static_assert(kTile % 32 == 0 && 128 % kTile == 0, "tiles cover whole 32-bit words of the mask rows");
  static constexpr int kWords = kTile / 32;
  uint32_t word[kWords];

  __device__ __forceinline__ void load(const uint32_t* row, int t0, int len) {
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      uint32_t bits = row != nullptr ? ld_global_u32(row + t0 / 32 + w) : 0xffffffffu;
      const int in_range = len - t0 - 32 * w;
      if (in_range < 32) bits &= in_range <= 0 ? 0u : (1u << in_range) - 1u;
      word[w] = bits;
    }
  }
  __device__ __forceinline__ bool all() const {
    bool r = true;
#pragma unroll
    for (int w = 0; w < kWords; ++w) r = r && word[w] == 0xffffffffu;
    return r;
  }
  __device__ __forceinline__ bool none() const {
    bool r = true;
#pragma unroll
    for (int w = 0; w < kWords; ++w) r = r && word[w] == 0u;
    return r;
  }
  // Bit `bit` of word `word_index`; word_index must be a compile-time constant (unrolled loop),
  // else the array goes to local memory.
  __device__ __forceinline__ bool test(int word_index, int bit) const { return (word[word_index] >> bit) & 1u; }
};

// Whether position i < len is a real token of the packed-bit row (always, without a mask).
__device__ __forceinline__ bool is_token(const uint32_t* row, int i, int len) {
  return i < len && (row == nullptr || ((ld_global_u32(row + i / 32) >> (i % 32)) & 1u));
}

// Whether the packed-bit row has any set bit among positions [t0, t0 + kTile): a tile worth
// computing. Always true without a mask.
template <int kTile>
__device__ __forceinline__ bool tile_has_tokens(const uint32_t* row, int t0) {
  if (row == nullptr) return true;
  TileBits<kTile> bits;
  bits.load(row, t0, kUnbounded);
  return !bits.none();
}

// The first tile index t >= from with t < end that holds a real token (end if none).
template <int kTile>
__device__ __forceinline__ int next_tile_with_tokens(const uint32_t* row, int from, int end) {
  int t = from;
  while (t < end && !tile_has_tokens<kTile>(row, t * kTile)) ++t;
  return t;
}

// The tiles [first, end) a block walks along the other axis: kOther-wide tiles covering the
// positions [lo, hi) it may see, starting at the first tile with a real token in `other_bits`.
// None (first = end) when the block's own kOwn-wide tile at own0 holds no real token.
template <int kOwn, int kOther>
__device__ __forceinline__ void tile_walk(int lo, int hi, const uint32_t* own_bits, int own0, const uint32_t* other_bits,
                                          int& first, int& end) {
  const int t_lo = lo / kOther;
  end = hi > lo ? ceil_div(hi, kOther) : t_lo;
  first = tile_has_tokens<kOwn>(own_bits, own0) ? next_tile_with_tokens<kOther>(other_bits, t_lo, end) : end;
}

}  // namespace l2vf
