// Tile configurations per head dim, the launch grids that go with them, and the sequence of
// launches of a forward and of a backward. `launch(kernel, grid, threads, smem_bytes, params)`
// is the CUDA launcher in launch.cuh (or the CPU emulator of the tests) and returns an error
// code, 0 = success; free of CUDA runtime calls itself.
//
// Chosen so that no hot kernel spills or keeps a stack frame on sm_80 and sm_90a (checked by
// tests/test_cuda_compile.py; measured numbers in benchmarks/NOTES.md).
#pragma once

#include "bwd_kernels.cuh"
#include "fwd_kernel.cuh"
#include "params.h"

namespace l2vf {

template <class Elem, int kHeadDim>
struct KernelConfigs;

// Forward: 128 query rows, 4 warps of 32 rows each (every K/V fragment feeds two mma rows), x 64 keys
// at head dim 64 and 32 keys at head dim 128 (at 64 keys its 32 rows need 255+ registers: NOTES v1.1).
// dK/dV: 128 keys, 16 per warp, x 64 queries (32 for head dim 128, same register reason).
// dQ (deterministic path): 64 query rows, 16 per warp, x 64 keys.
template <class Elem>
struct KernelConfigs<Elem, 64> {
  using Fwd = FwdConfig<Elem, 64, /*kBlockM=*/128, /*kBlockN=*/64, /*kWarps=*/4, /*kStages=*/2>;
  using BwdKV = BwdKVConfig<Elem, 64, /*kBlockM=*/64, /*kWarps=*/8, /*kStages=*/2>;
  using BwdQ = BwdQConfig<Elem, 64, /*kBlockM=*/64, /*kBlockN=*/64, /*kWarps=*/4, /*kStages=*/2>;
};

template <class Elem>
struct KernelConfigs<Elem, 128> {
  using Fwd = FwdConfig<Elem, 128, /*kBlockM=*/128, /*kBlockN=*/32, /*kWarps=*/4, /*kStages=*/2>;
  using BwdKV = BwdKVConfig<Elem, 128, /*kBlockM=*/32, /*kWarps=*/8, /*kStages=*/2>;
  using BwdQ = BwdQConfig<Elem, 128, /*kBlockM=*/64, /*kBlockN=*/64, /*kWarps=*/4, /*kStages=*/2>;
};

// The largest dynamic shared memory any kernel of a head dim asks for (the binding checks the
// device's opt-in limit against it).
template <class Elem, int kHeadDim>
constexpr int max_smem_bytes() {
  using C = KernelConfigs<Elem, kHeadDim>;
  constexpr int a = C::Fwd::kSmemBytes, b = C::BwdKV::kSmemBytes, c = C::BwdQ::kSmemBytes;
  return a > b ? (a > c ? a : c) : (b > c ? b : c);
}

template <class Cfg>
inline dim3 block_grid_over_queries(const AttnParams& p) {
  return dim3(ceil_div(p.seqlen_q, Cfg::kBlockM), p.heads_q, p.batch);
}

template <class Cfg>
inline dim3 block_grid_over_keys(const AttnParams& p) {
  return dim3(ceil_div(p.seqlen_k, Cfg::kBlockN), p.heads_kv, p.batch);
}

template <class Elem, int kHeadDim>
inline dim3 bwd_preprocess_grid(const AttnParams& p) {
  using Cfg = PreprocessConfig<Elem, kHeadDim>;
  const int64_t rows = p.tokens_q * p.heads_q;
  return dim3(static_cast<unsigned>((rows + Cfg::kRowsPerBlock - 1) / Cfg::kRowsPerBlock));
}

template <class Elem, int kHeadDim, class Launch>
auto launch_forward(const FwdParams& p, Launch&& launch) {
  using Cfg = typename KernelConfigs<Elem, kHeadDim>::Fwd;
  return launch(fwd_kernel<Cfg>, block_grid_over_queries<Cfg>(p), Cfg::kThreads, Cfg::kSmemBytes, p);
}

// delta and lse_log2: the first launch of every backward (the Hopper one's too).
template <class Elem, int kHeadDim, class Launch>
auto launch_bwd_preprocess(const BwdParams& p, Launch&& launch) {
  using Pre = PreprocessConfig<Elem, kHeadDim>;
  return launch(bwd_preprocess_kernel<Elem, kHeadDim>, bwd_preprocess_grid<Elem, kHeadDim>(p), Pre::kThreads, 0, p);
}

// delta and lse_log2, then dk and dv, then dq unless the dK/dV kernel added it to p.dq_accum.
template <class Elem, int kHeadDim, class Launch>
auto launch_backward(const BwdParams& p, Launch&& launch) {
  using Cfgs = KernelConfigs<Elem, kHeadDim>;
  using KV = typename Cfgs::BwdKV;
  using Q = typename Cfgs::BwdQ;
  auto err = launch_bwd_preprocess<Elem, kHeadDim>(p, launch);
  if (err == 0) err = launch(bwd_dkdv_kernel<KV>, block_grid_over_keys<KV>(p), KV::kThreads, KV::kSmemBytes, p);
  if (err == 0 && p.dq_accum == nullptr) {
    err = launch(bwd_dq_kernel<Q>, block_grid_over_queries<Q>(p), Q::kThreads, Q::kSmemBytes, p);
  }
  return err;
}

}  // namespace l2vf
