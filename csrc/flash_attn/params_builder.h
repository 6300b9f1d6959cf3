// Kernel parameters from strided tensor views: the one place that turns the flash-attn layouts
// and the attention options into FwdParams / BwdParams. Used by the torch binding and by the CPU
// emulator tests alike. Plain C++: no CUDA or torch headers.
#pragma once

#include <algorithm>
#include <cstdint>

#include "params.h"

namespace l2vf {

// A strided tensor of up to 4 dimensions (sizes and strides in elements).
struct TensorView {
  void* data;
  int dim;
  int64_t size[4];
  int64_t stride[4];
};

// The inputs every attention call shares. Padded layout: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D),
// key_bits optional. Varlen: q (Tq, Hq, D), k/v (Tk, Hkv, D), cu_seqlens of num_seqs + 1 offsets.
struct AttnArgs {
  TensorView q, k, v;
  const uint32_t* key_bits;  // packed mask rows of key_bits_words(seqlen_k) words, or null
  const int* cu_seqlens_q;   // null for the padded layout
  const int* cu_seqlens_k;
  int num_seqs;              // varlen only
  int max_seqlen_q, max_seqlen_k;
  bool causal;
  int window_left, window_right;  // -1 = unbounded
  float softcap, scale;
};

// Words per row of packed mask bits: whole 128-key tiles, so no tile reads past its row.
inline int key_bits_words(int64_t seqlen_k) { return static_cast<int>((seqlen_k + 127) / 128) * 4; }

inline int clamp_window(int w) { return w < 0 ? kUnbounded : std::min(w, kUnbounded); }

// (batch, row, head) strides of a padded (B, S, H, D) or varlen (T, H, D) tensor.
inline void token_strides(const TensorView& t, bool varlen, int64_t& batch, int64_t& row, int64_t& head) {
  batch = varlen ? 0 : t.stride[0];
  row = varlen ? t.stride[0] : t.stride[1];
  head = varlen ? t.stride[1] : t.stride[2];
}

inline void fill_attn_params(AttnParams& p, const AttnArgs& a) {
  const bool varlen = a.cu_seqlens_q != nullptr;
  p.q = a.q.data;
  p.k = a.k.data;
  p.v = a.v.data;
  token_strides(a.q, varlen, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  token_strides(a.k, varlen, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  token_strides(a.v, varlen, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  p.cu_seqlens_q = a.cu_seqlens_q;
  p.cu_seqlens_k = a.cu_seqlens_k;
  p.batch = varlen ? a.num_seqs : static_cast<int>(a.q.size[0]);
  p.seqlen_q = varlen ? a.max_seqlen_q : static_cast<int>(a.q.size[1]);
  p.seqlen_k = varlen ? a.max_seqlen_k : static_cast<int>(a.k.size[1]);
  p.tokens_q = varlen ? a.q.size[0] : a.q.size[0] * a.q.size[1];
  p.heads_q = static_cast<int>(a.q.size[a.q.dim - 2]);
  p.heads_kv = static_cast<int>(a.k.size[a.k.dim - 2]);
  p.group = p.heads_q / p.heads_kv;
  p.key_bits = varlen ? nullptr : a.key_bits;
  p.key_bits_stride = key_bits_words(p.seqlen_k);
  p.query_rows_masked = p.key_bits != nullptr && p.seqlen_q == p.seqlen_k;
  p.window_left = clamp_window(a.window_left);
  p.window_right = a.causal ? 0 : clamp_window(a.window_right);
  p.scale = a.scale;
  p.softcap = a.softcap;
  // lse-shaped buffers are contiguous (B, Hq, Sq) or (Hq, Tq).
  p.lse_batch_stride = varlen ? 0 : static_cast<int64_t>(p.heads_q) * p.seqlen_q;
  p.lse_head_stride = varlen ? p.tokens_q : p.seqlen_q;
}

inline FwdParams make_fwd_params(const AttnArgs& a, const TensorView& out, float* lse) {
  FwdParams p{};
  fill_attn_params(p, a);
  p.out = out.data;
  token_strides(out, a.cu_seqlens_q != nullptr, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.lse = lse;
  return p;
}

// dq_accum.data == nullptr selects the deterministic path (dq written by the dQ kernel).
inline BwdParams make_bwd_params(const AttnArgs& a, const TensorView& dout, const TensorView& out, const float* lse,
                                 const float* dlse, float* lse_log2, float* delta, const TensorView& dq,
                                 const TensorView& dk, const TensorView& dv, const TensorView& dq_accum) {
  const bool varlen = a.cu_seqlens_q != nullptr;
  BwdParams p{};
  fill_attn_params(p, a);
  p.out = out.data;
  p.dout = dout.data;
  token_strides(out, varlen, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  token_strides(dout, varlen, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  p.lse = lse;
  p.dlse = dlse;
  p.lse_log2 = lse_log2;
  p.delta = delta;
  p.dq = dq.data;
  p.dk = dk.data;
  p.dv = dv.data;
  token_strides(dq, varlen, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  token_strides(dk, varlen, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);  // dv: allocated like dk
  p.dq_accum = static_cast<float*>(dq_accum.data);
  if (p.dq_accum != nullptr) {
    token_strides(dq_accum, varlen, p.dqa_batch_stride, p.dqa_row_stride, p.dqa_head_stride);
  }
  return p;
}

inline MaskParams make_mask_params(const TensorView& mask, uint32_t* bits) {
  MaskParams p{};
  p.mask = static_cast<const bool*>(mask.data);
  p.mask_batch_stride = mask.stride[0];
  p.mask_key_stride = mask.stride[1];
  p.batch = static_cast<int>(mask.size[0]);
  p.seqlen_k = static_cast<int>(mask.size[1]);
  p.bits = bits;
  p.words_per_row = key_bits_words(mask.size[1]);
  return p;
}

}  // namespace l2vf
