// The Hopper forward's tile configuration per head dim, its tensor maps, and its launch. Like
// configs.cuh, free of CUDA runtime calls: `launch(kernel, grid, threads, smem_bytes, params)` is
// the CUDA launcher (launch_sm90.cuh) or the CPU emulator of the tests, and the tensor maps come
// from encode_tma_descriptor (tma_host.h, or the emulator's).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "../configs.cuh"
#include "../params.h"
#include "../tma_host.h"
#include "fwd_sm90.cuh"

namespace l2vf {

template <class Elem, int kHeadDim>
struct HopperConfigs;

// 128 query rows (two consumer warpgroups of 64) x 128 keys. Head dim 64: 3 stages (112 KB);
// head dim 128: 2 stages (160 KB), as FA3 without its intra-warpgroup overlap.
template <class Elem>
struct HopperConfigs<Elem, 64> {
  using Fwd = HopperFwdConfig<Elem, 64, /*kBlockN=*/128, /*kStages=*/3>;
};

template <class Elem>
struct HopperConfigs<Elem, 128> {
  using Fwd = HopperFwdConfig<Elem, 128, /*kBlockN=*/128, /*kStages=*/2>;
};

// The TMA view of a q/k/v operand: 4-D (head dim, token, head, sequence), 2-byte elements, boxes of
// 64 columns x box_rows tokens of one head of one sequence, 128-byte swizzled. A dimension of size 1
// gets a dense stride (its stride is never followed, and the driver wants multiples of 16 bytes).
inline TmaTensorSpec operand_spec(const void* base, int head_dim, int64_t tokens, int heads, int sequences,
                                  int64_t row_stride, int64_t head_stride, int64_t batch_stride, int box_rows) {
  TmaTensorSpec spec;
  spec.base = base;
  spec.rank = 4;
  spec.elem_bytes = 2;
  const uint64_t dims[4] = {static_cast<uint64_t>(head_dim), static_cast<uint64_t>(tokens),
                            static_cast<uint64_t>(heads), static_cast<uint64_t>(sequences)};
  const int64_t strides[4] = {1, row_stride, head_stride, batch_stride};
  for (int i = 0; i < 4; ++i) {
    spec.dims[i] = dims[i];
    if (i > 0) spec.strides[i] = dims[i] == 1 ? spec.dims[i - 1] * (i == 1 ? 2 : spec.strides[i - 1]) : 2 * strides[i];
  }
  spec.box[0] = 64;
  spec.box[1] = static_cast<uint32_t>(box_rows);
  spec.box[2] = 1;
  spec.box[3] = 1;
  spec.swizzle = Swizzle::k128B;
  return spec;
}

// The kernel parameters with q, k and v's tensor maps and the persistent grid's size (at most `ctas`,
// one block per SM on a GPU); kv_tokens is the length of k/v's token dimension (seqlen_k padded,
// total keys varlen). "" or why a map cannot be encoded.
// The length of q's (and dout's) token dimension: seqlen_q padded, total queries varlen.
inline int64_t query_tokens(const AttnParams& p) { return p.cu_seqlens_q != nullptr ? p.tokens_q : p.seqlen_q; }

// q, k and v's tensor maps, boxes of `box_q` query rows and `box_kv` key rows (the forward's and both backward
// kernels'); kv_tokens is the length of k/v's token dimension. "" or why a map cannot be encoded.
template <int kHeadDim>
std::string encode_qkv_maps(const AttnParams& p, int64_t kv_tokens, int box_q, int box_kv, TmaDescriptor* tma_q,
                            TmaDescriptor* tma_k, TmaDescriptor* tma_v) {
  const int sequences = p.cu_seqlens_q != nullptr ? 1 : p.batch;
  std::string problem = encode_tma_descriptor(operand_spec(p.q, kHeadDim, query_tokens(p), p.heads_q, sequences,
                                                           p.q_row_stride, p.q_head_stride, p.q_batch_stride, box_q),
                                              tma_q);
  if (problem.empty()) {
    problem = encode_tma_descriptor(operand_spec(p.k, kHeadDim, kv_tokens, p.heads_kv, sequences, p.k_row_stride,
                                                 p.k_head_stride, p.k_batch_stride, box_kv),
                                    tma_k);
  }
  if (problem.empty()) {
    problem = encode_tma_descriptor(operand_spec(p.v, kHeadDim, kv_tokens, p.heads_kv, sequences, p.v_row_stride,
                                                 p.v_head_stride, p.v_batch_stride, box_kv),
                                    tma_v);
  }
  return problem;
}

template <class Cfg>
std::string make_hopper_fwd_params(const FwdParams& p, int64_t kv_tokens, int ctas, HopperFwdParams& hp) {
  hp.p = p;
  hp.ctas = std::max(1, std::min(ctas, WorkTiles<Cfg::kBlockM>::total(p)));
  return encode_qkv_maps<Cfg::kHeadDim>(p, kv_tokens, Cfg::kBlockM, Cfg::kBlockN, &hp.tma_q, &hp.tma_k, &hp.tma_v);
}

template <class Elem, int kHeadDim, class Launch>
auto launch_forward_sm90(const HopperFwdParams& hp, Launch&& launch) {
  using Cfg = typename HopperConfigs<Elem, kHeadDim>::Fwd;
  const dim3 grid(WorkTiles<Cfg::kBlockM>::total(hp.p) > 0 ? hp.ctas : 0);
  return launch(fwd_sm90_kernel<Cfg>, grid, Cfg::kThreads, Cfg::kSmemBytes, hp);
}

}  // namespace l2vf
