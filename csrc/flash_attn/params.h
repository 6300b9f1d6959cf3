// Kernel parameters: plain structs filled by the torch binding and read by every kernel.
//
// Layouts (strides in elements, the last dimension contiguous):
//   padded: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D); varlen: q (Tq, Hq, D), k/v (Tk, Hkv, D) with
//   cu_seqlens; a varlen tensor is a padded one with batch stride 0, the sequence's first token
//   taken from cu_seqlens. lse-shaped float buffers (lse, its log2 copy, delta, dlse) are indexed
//   b * lse_batch_stride + h * lse_head_stride + token: (B, Hq, Sq) padded, (Hq, Tq) varlen.
// Plain C++: no CUDA or torch headers.
#pragma once

#include <cstdint>

namespace l2vf {

// A window bound meaning "unbounded": far beyond any sequence length, small enough that
// position +/- kUnbounded never overflows an int.
constexpr int kUnbounded = 1 << 30;

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;

  // Varlen: int32 (batch + 1) offsets of each sequence's first token; null for the padded layout.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;

  // Key-padding mask packed to bits: word key / 32 of row b, bit key % 32, set = real token.
  // Rows hold key_bits_stride words, a multiple of 4 (so a 128-key tile never reads past a row),
  // zero beyond seqlen_k. Null when there is no mask.
  const uint32_t* key_bits;
  int key_bits_stride;
  // The key mask also marks padded query rows (self-attention: seqlen_q == seqlen_k).
  bool query_rows_masked;

  int batch, heads_q, heads_kv, group;  // group = heads_q / heads_kv
  int seqlen_q, seqlen_k;               // padded: the tensors' lengths; varlen: the max lengths
  int64_t tokens_q;                     // query tokens: batch * seqlen_q (padded) or total_q (varlen)

  // Query i of a sequence sees key j iff i + (len_k - len_q) - left <= j <= i + (len_k - len_q) + right.
  // Both >= 0, kUnbounded for none; causal is right = 0.
  int window_left, window_right;
  float scale;    // softmax scale
  float softcap;  // > 0: scores become softcap * tanh(score / softcap)

  int64_t lse_batch_stride, lse_head_stride;
};

struct FwdParams : AttnParams {
  void* out;  // like q, contiguous
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  float* lse;  // natural-log log-sum-exp; -inf for rows that see no key
};

struct BwdParams : AttnParams {
  const void* out;
  const void* dout;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  const float* lse;
  const float* dlse;  // gradient of lse, lse-shaped and contiguous; null when absent
  float* lse_log2;    // lse * log2(e), +inf where lse = -inf (written by the preprocess kernel)
  float* delta;       // rowsum(dout * out) - dlse        (written by the preprocess kernel)

  void* dq;  // like q, contiguous; written by the dQ kernel (deterministic path)
  void* dk;  // like k, contiguous
  void* dv;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;  // shared by dk and dv
  // float32, q-shaped and zero-initialised: the dK/dV kernel adds unscaled dS @ K into it with
  // atomics (fast path); null on the deterministic path.
  float* dq_accum;
  int64_t dqa_batch_stride, dqa_row_stride, dqa_head_stride;
};

// Key-padding mask to bits (see AttnParams::key_bits).
struct MaskParams {
  const bool* mask;
  int64_t mask_batch_stride, mask_key_stride;
  int batch, seqlen_k;
  uint32_t* bits;
  int words_per_row;
};

}  // namespace l2vf
