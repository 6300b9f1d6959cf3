// A small warp-specialised TMA + mbarrier + wgmma pipeline written against ptx_sm90.cuh, the
// shape of an attention forward without the softmax: O = sum over key tiles of
// cast(Q Kᵀ) V for 128 query rows, head dim 64, 64-key tiles in a two-stage ring.
//
// Warpgroup 0 is the producer (one elected thread issues the TMA loads), warpgroups 1 and 2
// consume 64 query rows each: S = Q Kᵀ with both operands from shared memory (SS, K-major),
// P = S rounded to 16 bits kept in registers as the A operand of O += P V (RS, V N-major), each
// stage released on its empty barrier; the epilogue stages O in shared memory and one thread
// TMA-stores it. Every wrapper of ptx_sm90.cuh is used. Compiled for sm_90a by
// tests/test_cuda_compile.py (sm90_pipeline.cu) and run on the CPU emulator, correct and with
// planted bugs, by tests/test_cuda_emulator_sm90.py (selftest_sm90.cpp).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <string>

namespace l2vf_test {

using l2vf::Major;
using l2vf::Swizzle;
using l2vf::TmaDescriptor;

constexpr int kRows = 128, kDim = 64, kKeyTile = 64, kStages = 2, kThreads = 384;

// Planted bugs: each makes the pipeline wrong in one classic way (kNone is correct).
enum Bug : int {
  kNone = 0,
  kWrongSwizzle,          // the wgmma descriptors name another swizzle than the TMA loads
  kNoProxyFence,          // the epilogue's ordinary stores reach the TMA store without fence.proxy.async
  kWrongParity,           // consumers wait for the other parity of the full barrier
  kNoFullWait,            // consumers read a stage (after the first) without waiting for its barrier
  kNoEmptyWait,           // the producer reloads a stage without waiting for the consumers' release
  kEarlyAccumulatorRead,  // S is read (stored) before wgmma_wait retired it
  kNoWgmmaFence,          // no wgmma_fence before the P·V wgmmas
  kWrongExpectTx,         // expect_tx announces more bytes than the loads deliver
  kAccumulatorWrite,      // S is written while its wgmma is in flight
  kRegisterOverflow,      // consumers ask for more registers than the file holds
  kSmemWriteInFlight,     // a consumer overwrites its K stage while the S wgmma reading it is in flight
  kUnfencedOperand,       // ordinary stores into Q reach the S wgmma without fence.proxy.async
  kNamedBarrierCount,     // the consumers disagree on the epilogue barrier's thread count
  kWriteAfterFence,       // O is rescaled after the wgmma_fence that precedes its P·V wgmmas
};

struct PipelineParams {
  TmaDescriptor q;  // 2-D (dim, rows), box (span / 2, 128)
  TmaDescriptor k;  // 3-D (dim, heads, keys), box (span / 2, 1, 64)
  TmaDescriptor v;  // 4-D (dim, heads, keys, 1), box (span / 2, 1, 64, 1)
  TmaDescriptor o;  // 2-D float (dim, rows), box (64, 128), no swizzle
  float* probe;     // 256 floats: one element of each consumer thread's first S
  int key_tiles;
  int head;
  int span;  // swizzle of the TMA loads and the descriptors, 32, 64 or 128 bytes
  int bug;
};

// Shared memory, from a 1024-byte aligned base.
constexpr uint32_t kQBytes = kRows * kDim * 2, kTileBytes = kKeyTile * kDim * 2;
constexpr uint32_t kQ = 0, kK = kQ + kQBytes, kV = kK + kStages * kTileBytes, kO = kV + kStages * kTileBytes;
constexpr uint32_t kBarriers = kO + kRows * kDim * 4;                      // full[2], empty[2], q_full
constexpr uint32_t kSmemBytes = kBarriers + 8 * (2 * kStages + 1) + 1024;  // + alignment slack

__device__ __forceinline__ Swizzle swizzle_of(int span) {
  return span == 32 ? Swizzle::k32B : span == 64 ? Swizzle::k64B : Swizzle::k128B;
}

// A K-major operand of `rows` rows stored as span-wide column blocks of rows x span bytes; the
// descriptor of k-step kk (columns 16kk .. 16kk + 15), starting at row `row0`.
__device__ __forceinline__ uint64_t k_major_desc(uint32_t tile, int rows, int row0, int kk, int span, Swizzle swz) {
  const int cols_per_block = span / 2, col = 16 * kk;
  const uint32_t start = tile + (col / cols_per_block) * rows * span + row0 * span + (col % cols_per_block) * 2;
  return l2vf::make_smem_desc(start, swz, 16, 8 * span);
}

// V (keys x dim, dim contiguous) as the N-major B operand of k-step j (keys 16j .. 16j + 15).
__device__ __forceinline__ uint64_t n_major_desc(uint32_t tile, int j, int span, Swizzle swz) {
  return l2vf::make_smem_desc(tile + 16 * j * span, swz, kKeyTile * span, 8 * span);
}

template <class Elem>
__device__ void produce(const PipelineParams& p, uint32_t s) {
  const uint32_t full = s + kBarriers, empty = full + 8 * kStages, q_full = empty + 8 * kStages;
  const int blocks = 128 / p.span, cols = p.span / 2;
  l2vf::tma_prefetch_descriptor(p.q);
  l2vf::tma_prefetch_descriptor(p.k);
  l2vf::tma_prefetch_descriptor(p.v);
  l2vf::mbarrier_arrive_expect_tx(q_full, kQBytes);
  for (int b = 0; b < blocks; ++b) l2vf::tma_load_2d(s + kQ + b * kRows * p.span, p.q, q_full, b * cols, 0);
  for (int t = 0; t < p.key_tiles; ++t) {
    const int stage = t % kStages;
    // The first round waits for parity 1, which a fresh barrier has passed already.
    if (p.bug != kNoEmptyWait) l2vf::mbarrier_wait(empty + 8 * stage, ((t / kStages) & 1) ^ 1);
    const uint32_t bar = full + 8 * stage;
    l2vf::mbarrier_arrive_expect_tx(bar, 2 * kTileBytes + (p.bug == kWrongExpectTx ? 16 : 0));
    for (int b = 0; b < blocks; ++b) {
      const uint32_t offset = stage * kTileBytes + b * kKeyTile * p.span;
      l2vf::tma_load_3d(s + kK + offset, p.k, bar, b * cols, p.head, t * kKeyTile);
      l2vf::tma_load_4d(s + kV + offset, p.v, bar, b * cols, p.head, t * kKeyTile, 0);
    }
  }
}

template <class Elem>
__device__ void consume(const PipelineParams& p, uint32_t s, int consumer) {
  const uint32_t full = s + kBarriers, empty = full + 8 * kStages, q_full = empty + 8 * kStages;
  const int t_wg = static_cast<int>(threadIdx.x) % 128;
  const Swizzle swz = swizzle_of(p.bug == kWrongSwizzle ? (p.span == 128 ? 64 : 128) : p.span);
  float o[kDim / 2];
  for (float& x : o) x = 0.f;
  l2vf::mbarrier_wait(q_full, 0);
  // Each thread rewrites one word of its warpgroup's Q rows (same value) with an ordinary store, so
  // that the S wgmma reads generic-proxy writes: fence.proxy.async, then the warpgroup's barrier.
  const uint32_t q_word = s + kQ + (64 * consumer + t_wg / 2) * p.span + 8 * (t_wg % 2);
  l2vf::st_shared_u32(q_word, __float_as_uint(l2vf::ld_shared_f32x2(q_word).x));
  if (p.bug != kUnfencedOperand) l2vf::fence_proxy_async();
  l2vf::named_barrier_sync(3 + consumer, 128);
  for (int t = 0; t < p.key_tiles; ++t) {
    const int stage = t % kStages;
    const uint32_t parity = (t / kStages) & 1;
    if (!(p.bug == kNoFullWait && t > 0))
      l2vf::mbarrier_wait(full + 8 * stage, p.bug == kWrongParity ? parity ^ 1 : parity);
    const uint32_t k_tile = s + kK + stage * kTileBytes, v_tile = s + kV + stage * kTileBytes;
    float acc[kKeyTile / 2];
    l2vf::wgmma_fence();
    for (int kk = 0; kk < kDim / 16; ++kk) {
      l2vf::wgmma_ss<Elem, kKeyTile, Major::kK, Major::kK>(acc,
                                                           k_major_desc(s + kQ, kRows, 64 * consumer, kk, p.span, swz),
                                                           k_major_desc(k_tile, kKeyTile, 0, kk, p.span, swz), kk > 0);
    }
    l2vf::wgmma_commit();
    if (p.bug == kEarlyAccumulatorRead && t == 0) l2vf::st_global_f32(p.probe + 128 * consumer + t_wg, acc[0]);
    if (p.bug == kAccumulatorWrite) acc[1] = 0.f;
    if (p.bug == kSmemWriteInFlight) l2vf::st_shared_u32(k_tile + 4 * t_wg, 0u);
    l2vf::wgmma_wait<0>();
    l2vf::wgmma_fence_operands(acc);
    if (p.bug != kEarlyAccumulatorRead && t == 0) l2vf::st_global_f32(p.probe + 128 * consumer + t_wg, acc[0]);
    uint32_t pa[kKeyTile / 16][4];
    for (int j = 0; j < kKeyTile / 16; ++j) {
      for (int r = 0; r < 4; ++r) pa[j][r] = l2vf::pack_pair<Elem>(acc[8 * j + 2 * r], acc[8 * j + 2 * r + 1]);
    }
    if (p.bug != kNoWgmmaFence) l2vf::wgmma_fence();
    if (p.bug == kWriteAfterFence) o[0] *= 0.5f;
    for (int j = 0; j < kKeyTile / 16; ++j) {
      l2vf::wgmma_rs<Elem, kDim, Major::kMN>(o, pa[j], n_major_desc(v_tile, j, p.span, swz), t > 0 || j > 0);
    }
    l2vf::wgmma_commit();
    l2vf::wgmma_wait<0>();
    l2vf::wgmma_fence_operands(o);
    if (t_wg == 0) l2vf::mbarrier_arrive(empty + 8 * stage);
  }
  // O fragment -> shared memory, row-major float rows of 256 bytes.
  const int warp = t_wg / 32, g = (t_wg % 32) / 4, q = t_wg % 4;
  for (int j = 0; j < kDim / 8; ++j) {
    for (int v = 0; v < 4; ++v) {
      const int row = 64 * consumer + 16 * warp + g + 8 * (v / 2), col = 8 * j + 2 * q + v % 2;
      l2vf::st_shared_u32(s + kO + (row * kDim + col) * 4, __float_as_uint(o[4 * j + v]));
    }
  }
  if (p.bug != kNoProxyFence) l2vf::fence_proxy_async();
  l2vf::named_barrier_sync(1, p.bug == kNamedBarrierCount && consumer == 1 ? 128 : 256);
  if (t_wg == 0 && consumer == 0) {
    l2vf::tma_store_2d(p.o, s + kO, 0, 0);
    l2vf::tma_store_commit();
    l2vf::tma_store_wait<0>();
  }
  l2vf::named_barrier_arrive(2, 256);  // exercised: nobody syncs on barrier 2
}

template <class Elem>
__global__ void __launch_bounds__(kThreads, 1) sm90_pipeline_kernel(const __grid_constant__ PipelineParams p) {
  const uint32_t s = (l2vf::dynamic_smem() + 1023) & ~1023u;
  const uint32_t full = s + kBarriers, empty = full + 8 * kStages, q_full = empty + 8 * kStages;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages; ++i) {
      l2vf::mbarrier_init(full + 8 * i, 1);
      l2vf::mbarrier_init(empty + 8 * i, 2);
    }
    l2vf::mbarrier_init(q_full, 1);
    l2vf::mbarrier_init_fence();
  }
  __syncthreads();
  const int warpgroup = static_cast<int>(threadIdx.x) / 128;
  if (warpgroup == 0) {
    l2vf::setmaxnreg_dec<40>();
    if (threadIdx.x < 32 && l2vf::elect_one()) produce<Elem>(p, s);
  } else {
    if (p.bug == kRegisterOverflow) {
      l2vf::setmaxnreg_inc<256>();
    } else {
      l2vf::setmaxnreg_inc<232>();
    }
    consume<Elem>(p, s, warpgroup - 1);
  }
}

// A dense row-major tensor's tiled view: dims innermost first, byte strides from them.
inline l2vf::TmaTensorSpec dense_spec(const void* base, int elem_bytes, std::initializer_list<uint64_t> dims,
                                      std::initializer_list<uint32_t> box, Swizzle swizzle) {
  l2vf::TmaTensorSpec s;
  s.base = base;
  s.rank = static_cast<int>(dims.size());
  s.elem_bytes = elem_bytes;
  int i = 0;
  for (uint64_t d : dims) s.dims[i++] = d;
  i = 0;
  for (uint32_t b : box) s.box[i++] = b;
  uint64_t stride = static_cast<uint64_t>(elem_bytes);
  for (i = 0; i < s.rank; ++i) {
    if (i > 0) s.strides[i] = stride;
    stride *= s.dims[i];
  }
  s.swizzle = swizzle;
  return s;
}

// The pipeline's parameters for q (128, 64), k and v (keys, heads, 64) of 16-bit elements, o
// (128, 64) floats (device addresses on a GPU): the tensor maps encoded, "" or why not.
inline std::string make_pipeline_params(PipelineParams& p, int bug, int span, int keys, int heads, int head,
                                        const void* q, const void* k, const void* v, float* o, float* probe) {
  const Swizzle swz = span == 32 ? Swizzle::k32B : span == 64 ? Swizzle::k64B : Swizzle::k128B;
  const uint32_t cols = static_cast<uint32_t>(span / 2);
  const uint64_t h = static_cast<uint64_t>(heads), n = static_cast<uint64_t>(keys);
  std::string error = l2vf::encode_tma_descriptor(dense_spec(q, 2, {kDim, kRows}, {cols, kRows}, swz), &p.q);
  if (error.empty())
    error = l2vf::encode_tma_descriptor(dense_spec(k, 2, {kDim, h, n}, {cols, 1, kKeyTile}, swz), &p.k);
  if (error.empty()) {
    error = l2vf::encode_tma_descriptor(dense_spec(v, 2, {kDim, h, n, 1}, {cols, 1, kKeyTile, 1}, swz), &p.v);
  }
  if (error.empty()) {
    error = l2vf::encode_tma_descriptor(dense_spec(o, 4, {kDim, kRows}, {kDim, kRows}, Swizzle::kNone), &p.o);
  }
  p.probe = probe;
  p.key_tiles = (keys + kKeyTile - 1) / kKeyTile;
  p.head = head;
  p.span = span;
  p.bug = bug;
  return error;
}

}  // namespace l2vf_test
