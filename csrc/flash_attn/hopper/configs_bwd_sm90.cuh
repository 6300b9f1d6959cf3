// The Hopper backward's tile configuration per head dim, its tensor maps, and its launches. Like
// configs_sm90.cuh, free of CUDA runtime calls: `launch(kernel, grid, threads, smem_bytes, params)` is
// the CUDA launcher or the CPU emulator of the tests.
#pragma once

#include <algorithm>
#include <string>

#include "../configs.cuh"
#include "../params.h"
#include "../tma_host.h"
#include "bwd_dq_sm90.cuh"
#include "bwd_sm90.cuh"
#include "configs_sm90.cuh"

namespace l2vf {

template <class Elem, int kHeadDim>
struct HopperBwdConfigs;

// dK/dV: 128 keys (two consumer warpgroups of 64) x 64 queries, Q and dO double-buffered:
// head dim 64 80 KB of shared memory, head dim 128 144 KB.
// dQ (deterministic path): 128 queries (two consumer warpgroups of 64) x 64 keys, K and V double-buffered:
// head dim 64 65 KB, head dim 128 129 KB.
template <class Elem>
struct HopperBwdConfigs<Elem, 64> {
  using KV = HopperBwdConfig<Elem, 64, /*kBlockM=*/64, /*kStages=*/2>;
  using Q = HopperDqConfig<Elem, 64, /*kBlockN=*/64, /*kStages=*/2>;
};

template <class Elem>
struct HopperBwdConfigs<Elem, 128> {
  using KV = HopperBwdConfig<Elem, 128, /*kBlockM=*/64, /*kStages=*/2>;
  using Q = HopperDqConfig<Elem, 128, /*kBlockN=*/64, /*kStages=*/2>;
};

// The dynamic shared memory per block the Hopper backward of a head dim needs at most.
template <class Elem, int kHeadDim>
constexpr int hopper_bwd_smem_bytes() {
  using C = HopperBwdConfigs<Elem, kHeadDim>;
  return C::KV::kSmemBytes > C::Q::kSmemBytes ? C::KV::kSmemBytes : C::Q::kSmemBytes;
}

// The kernel parameters with q, dout, k and v's tensor maps and the persistent grid's size (at most `ctas`,
// one block per SM on a GPU, over the kernel's `Work` tiles); kv_tokens is the length of k/v's token dimension
// (seqlen_k padded, total keys varlen). "" or why a map cannot be encoded.
template <class Cfg, class Work>
std::string make_hopper_bwd_params(const BwdParams& p, int64_t kv_tokens, int ctas, HopperBwdParams& hp) {
  hp.p = p;
  hp.ctas = std::max(1, std::min(ctas, Work::total(p)));
  std::string problem =
      encode_qkv_maps<Cfg::kHeadDim>(p, kv_tokens, Cfg::kBlockM, Cfg::kBlockN, &hp.tma_q, &hp.tma_k, &hp.tma_v);
  if (problem.empty()) {
    const int sequences = p.cu_seqlens_q != nullptr ? 1 : p.batch;
    problem = encode_tma_descriptor(operand_spec(p.dout, Cfg::kHeadDim, query_tokens(p), p.heads_q, sequences,
                                                 p.do_row_stride, p.do_head_stride, p.do_batch_stride, Cfg::kBlockM),
                                    &hp.tma_do);
  }
  return problem;
}

// The parameters of both kernels of a Hopper backward (their tensor maps' boxes differ); dq's are unset on the
// atomic path.
struct HopperBwdLaunchParams {
  HopperBwdParams dkdv, dq;
};

// The work tiles of each kernel: the dK/dV kernel's over key tiles per kv head, the dQ kernel's over query tiles
// per query head.
template <class Cfg>
using DkdvWork = BwdWorkTiles<Cfg::kBlockN, true>;
template <class Cfg>
using DqWork = BwdWorkTiles<Cfg::kBlockM, false>;

// Both kernels' parameters, each a persistent grid of at most `ctas` blocks; the dQ kernel's only for the
// deterministic path (p.dq_accum null). "" or why a map cannot be encoded.
template <class Elem, int kHeadDim>
std::string make_hopper_bwd_launch_params(const BwdParams& p, int64_t kv_tokens, int ctas, HopperBwdLaunchParams& lp) {
  using KV = typename HopperBwdConfigs<Elem, kHeadDim>::KV;
  using Q = typename HopperBwdConfigs<Elem, kHeadDim>::Q;
  std::string problem = make_hopper_bwd_params<KV, DkdvWork<KV>>(p, kv_tokens, ctas, lp.dkdv);
  if (problem.empty() && p.dq_accum == nullptr) {
    problem = make_hopper_bwd_params<Q, DqWork<Q>>(p, kv_tokens, ctas, lp.dq);
  }
  return problem;
}

// The grid of a kernel over its work tiles: hp.ctas blocks, none when there is no work tile.
template <class Work>
dim3 persistent_grid(const HopperBwdParams& hp) {
  return dim3(Work::total(hp.p) > 0 ? hp.ctas : 0);
}

// After launch_bwd_preprocess has written delta and lse_log2: dk and dv, and dq either added to p.dq_accum
// (when set: atomics, fast) or written by the dQ kernel (one writer per element: deterministic).
template <class Elem, int kHeadDim, class Launch>
auto launch_backward_sm90(const HopperBwdLaunchParams& lp, Launch&& launch) {
  using KV = typename HopperBwdConfigs<Elem, kHeadDim>::KV;
  using Q = typename HopperBwdConfigs<Elem, kHeadDim>::Q;
  const BwdParams& p = lp.dkdv.p;
  const dim3 dkdv_grid = persistent_grid<DkdvWork<KV>>(lp.dkdv);
  if (p.dq_accum != nullptr) {
    return launch(bwd_sm90_kernel<KV, true>, dkdv_grid, KV::kThreads, KV::kSmemBytes, lp.dkdv);
  }
  auto err = launch(bwd_sm90_kernel<KV, false>, dkdv_grid, KV::kThreads, KV::kSmemBytes, lp.dkdv);
  if (err == 0) {
    err = launch(bwd_dq_sm90_kernel<Q>, persistent_grid<DqWork<Q>>(lp.dq), Q::kThreads, Q::kSmemBytes, lp.dq);
  }
  return err;
}

}  // namespace l2vf
