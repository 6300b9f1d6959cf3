// The attention backward's dQ kernel for Hopper (sm_90a): the deterministic path's last launch, after the
// preprocess and bwd_sm90_kernel<Cfg, false> (dK and dV only). Each dQ element has one writer (a plain store),
// so dq is the same bit for bit whatever order the blocks run in.
//
// A persistent grid of hp.ctas blocks (at most one per SM) over the work tiles (query tile of kBlockM rows,
// query head, sequence) in BwdWorkTiles' order (bwd_sm90.cuh), tiles past a sequence's end skipped by the
// producer and the consumers alike; three warpgroups, the forward's layout (fwd_sm90.cuh). Warpgroup 0 is the
// producer: per work tile, one thread loads Q and dO (q_full, once the consumers have released the previous
// work tile's, which staged its dQ: q_empty), then K and V of every key tile its queries see (tiles without a
// real key skipped; kv head h / group: GQA without expanding K/V) into a kStages-deep ring (full: the TMA
// bytes; a stage is reused once both consumers have arrived on its empty mbarrier); the ring's stage and phase
// and the Q barriers' phases run on across work tiles. Warpgroups 1 and 2 are the consumers, 64 query rows
// each; per key tile:
//   S = Q K^T, dP = dO V^T            wgmma m64 n{kBlockN} k16, both operands K-major in shared memory,
//   P = 2^(S log2 - lse2), dS = P (dP - delta) (1 - t^2)  in registers, unseen pairs selected to 0,
//   dQ += dS K                        wgmma m64 n{kHeadDim} k16, dS from registers, K MN-major.
// lse2 and delta of a thread's two rows are read once, from the preprocess's rows in global memory.
// The epilogue is the sm80 dQ kernel's: scaled, padding rows 0, rows a 0 * NaN may have poisoned (TMA loads
// out-of-sequence and padding keys as they are) recomputed exactly, staged through the warpgroup's own Q rows.
#pragma once

#include <cstdint>

#include "../block_info.cuh"
#include "../bwd_kernels.cuh"
#include "../fwd_kernel.cuh"
#include "../params.h"
#include "../ptx_sm90.cuh"
#include "../tile.cuh"
#include "bwd_sm90.cuh"
#include "fwd_sm90.cuh"
#include "tile_sm90.cuh"

namespace l2vf {

template <class Elem_, int kHeadDim_, int kBlockN_, int kStages_>
struct HopperDqConfig {
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_, kBlockN = kBlockN_, kStages = kStages_;
  static constexpr int kConsumers = 2;  // warpgroups of 64 query rows
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  using QTile = SwizzledPanels<kBlockM, kHeadDim>;   // Q and dO, then dQ staged
  using KVTile = SwizzledPanels<kBlockN, kHeadDim>;  // K and V
  static constexpr int kBoxBytesQ = QTile::kBytes;
  static constexpr int kBoxBytesKV = KVTile::kBytes;
  // From a 1024-byte aligned base: Q, dO, K stages, V stages, then the mbarriers (q full, q empty; per stage
  // full, empty), 8 bytes each.
  static constexpr int kOffDo = QTile::kBytes;
  static constexpr int kOffK = 2 * QTile::kBytes;
  static constexpr int kOffV = kOffK + kStages * KVTile::kBytes;
  static constexpr int kOffBarriers = kOffV + kStages * KVTile::kBytes;
  static constexpr int kSmemBytes = 1024 + kOffBarriers + 8 * (2 + 2 * kStages);

  static_assert(kHeadDim % 64 == 0 && kHeadDim <= 256, "wgmma n = head dim, whole 64-column panels");
  static_assert(kBlockN % 32 == 0 && 128 % kBlockN == 0, "key tiles cover whole words of the mask bits");
  static_assert(kStages >= 2, "the ring needs at least double buffering");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one sm_90 block");
};

constexpr int kDqConsumerBarrier0 = 1;  // + consumer index: each consumer warpgroup's own barrier

// Shared-window addresses of the block's tiles and mbarriers.
template <class Cfg>
struct HopperDqSmem {
  uint32_t q, d_o, k, v;        // k, v: kStages tiles each
  uint32_t q_full, q_empty, full, empty;  // full, empty: kStages barriers each, 8 bytes apart

  __device__ __forceinline__ explicit HopperDqSmem(uint32_t base) {
    const uint32_t aligned = (base + 1023u) & ~1023u;
    q = aligned;
    d_o = aligned + Cfg::kOffDo;
    k = aligned + Cfg::kOffK;
    v = aligned + Cfg::kOffV;
    q_full = aligned + Cfg::kOffBarriers;
    q_empty = q_full + 8;
    full = q_empty + 8;
    empty = full + 8 * Cfg::kStages;
  }
  __device__ __forceinline__ uint32_t stage(uint32_t ring, int s) const {
    return ring + static_cast<uint32_t>(s * Cfg::KVTile::kBytes);
  }
};

// One work tile of the producer (its queries see a key): thread 0 loads Q and dO once the consumers have
// released the previous work tile's (q_round: the work tiles this block has loaded), then K and V of every key
// tile of the walk; `it` counts the ring's tiles across work tiles.
template <class Cfg>
__device__ __forceinline__ void produce_dq_tile(const HopperBwdParams& hp, const HopperDqSmem<Cfg>& sm,
                                                const HopperBlock<Cfg::kBlockM, Cfg::kBlockN>& blk, int& it,
                                                int q_round) {
  constexpr int kPanels = Cfg::QTile::kPanels, kStages = Cfg::kStages;
  const BwdParams& p = hp.p;
  const int bc = blk.batch_coord(p);
  const int token = blk.seq.q_token0 + blk.m0;
  // A fresh barrier counts as having completed the phase before its first: the first wait passes at once.
  mbarrier_wait(sm.q_empty, (q_round & 1) ^ 1);
  mbarrier_arrive_expect_tx(sm.q_full, 2 * Cfg::kBoxBytesQ);
#pragma unroll
  for (int panel = 0; panel < kPanels; ++panel) {
    const uint32_t off = panel * Cfg::QTile::kPanelBytes;
    tma_load_4d(sm.q + off, hp.tma_q, sm.q_full, 64 * panel, token, blk.h, bc);
    tma_load_4d(sm.d_o + off, hp.tma_do, sm.q_full, 64 * panel, token, blk.h, bc);
  }
#pragma unroll 1
  for (int tile = blk.t_first; tile < blk.t_hi; tile = blk.after(tile), ++it) {
    const int s = it % kStages;
    mbarrier_wait(sm.empty + 8 * s, ((it / kStages) & 1) ^ 1);
    const int key_token = blk.seq.k_token0 + tile * Cfg::kBlockN;
    mbarrier_arrive_expect_tx(sm.full + 8 * s, 2 * Cfg::kBoxBytesKV);
#pragma unroll
    for (int panel = 0; panel < kPanels; ++panel) {
      const uint32_t off = panel * Cfg::KVTile::kPanelBytes;
      tma_load_4d(sm.stage(sm.k, s) + off, hp.tma_k, sm.full + 8 * s, 64 * panel, key_token, blk.hk, bc);
      tma_load_4d(sm.stage(sm.v, s) + off, hp.tma_v, sm.full + 8 * s, 64 * panel, key_token, blk.hk, bc);
    }
  }
}

// The producer: every work tile of this block, those whose queries see no key skipped (the consumers write
// zeros).
template <class Cfg>
__device__ __forceinline__ void produce_dq(const HopperBwdParams& hp, const HopperDqSmem<Cfg>& sm) {
  using Work = BwdWorkTiles<Cfg::kBlockM, false>;
  setmaxnreg_dec<Cfg::kProducerRegs>();
  if (threadIdx.x != 0) return;
  const BwdParams& p = hp.p;
  int it = 0, q_round = 0;
#pragma unroll 1
  for (int w = blockIdx.x; w < Work::total(p); w += hp.ctas) {
    int m_block, h, b;
    Work::coords(w, p, m_block, h, b);
    const HopperBlock<Cfg::kBlockM, Cfg::kBlockN> blk(p, m_block, h, b);
    if (blk.t_first < blk.t_hi) produce_dq_tile<Cfg>(hp, sm, blk, it, q_round++);
  }
}

// dq of this consumer's 64 rows when the block's queries see no key: zeros.
template <class Cfg>
__device__ __forceinline__ void write_zero_dq(const BwdParams& p, const HopperBlock<Cfg::kBlockM, Cfg::kBlockN>& blk,
                                              int consumer) {
  constexpr int kChunks = Cfg::kHeadDim / 8;
  uint16_t* dq = static_cast<uint16_t*>(p.dq) + token_offset(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride,
                                                             blk.b, blk.seq.q_token0 + blk.m0, blk.h);
  // thread is opaque so that the addresses derived from it are not hoisted out of the persistent loop (where they
  // would stay live across it and spill).
  const int r0 = 64 * consumer, rows = min(64, blk.rows - r0), thread = static_cast<int>(opaque(threadIdx.x) % 128);
  for (int idx = thread; idx < rows * kChunks; idx += 128) {
    st_global_16(dq + (r0 + idx / kChunks) * p.dq_row_stride + (idx % kChunks) * 8, make_uint4(0u, 0u, 0u, 0u));
  }
}

// One consumer warpgroup on one work tile whose queries see a key: its 64 query rows against every key tile of
// the walk, then dQ, staged through its Q rows, which then go back to the producer (q_empty). `it` counts the
// ring's tiles across work tiles, q_round the Q tiles.
template <class Cfg>
__device__ __forceinline__ void consume_dq_tile(const HopperBwdParams& hp,
                                                const HopperBlock<Cfg::kBlockM, Cfg::kBlockN>& blk,
                                                const HopperDqSmem<Cfg>& sm, int consumer, int& it, int q_round) {
  using Elem = typename Cfg::Elem;
  using QTile = typename Cfg::QTile;
  using KVTile = typename Cfg::KVTile;
  constexpr int D = Cfg::kHeadDim, BN = Cfg::kBlockN, kStages = Cfg::kStages;
  constexpr int kNT = BN / 8, kDT = D / 8;  // n8 column tiles of S / dP and of dQ
  const BwdParams& p = hp.p;
  const SeqSlice& seq = blk.seq;
  const int token = seq.q_token0 + blk.m0;
  uint16_t* dq = static_cast<uint16_t*>(p.dq) +
                 token_offset(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, blk.b, token, blk.h);
  const int thread = static_cast<int>(threadIdx.x) % 128;
  const int warp = thread / 32, lane = thread % 32;
  const int wg_row0 = 64 * consumer;          // first row of this warpgroup within the block's tile
  const int warp_row0 = wg_row0 + 16 * warp;  // first row of this warp
  const uint32_t* query_bits = blk.query_bits(p);
  const int64_t l_off = lse_offset(p, blk.b, blk.h, seq.q_token0 + blk.m0);

  // lse (log2 units) and delta of this thread's rows g and g + 8; rows past the sequence see nothing.
  float row_lse2[2], row_delta[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int r = warp_row0 + lane / 4 + 8 * hf;
    row_lse2[hf] = r < blk.rows ? ld_global_f32(p.lse_log2 + l_off + r) : INFINITY;
    row_delta[hf] = r < blk.rows ? ld_global_f32(p.delta + l_off + r) : 0.f;
  }

  const ScoreTransform score(p);
  float acc_dq[D / 2];  // n8 tile dt: [4 dt .. 4 dt + 3], rows = queries
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc_dq[i] = 0.f;

  float acc_s[BN / 2], acc_dp[BN / 2];  // S, dP of a key tile: n8 tile nt = keys 8 nt ..; then P, dS (outside
                                        // the loop for the reason bwd_sm90.cuh gives)
  mbarrier_wait(sm.q_full, q_round & 1);
#pragma unroll 1
  for (int tile = blk.t_first; tile < blk.t_hi; tile = blk.after(tile), ++it) {
    const int s = it % kStages;
    const uint32_t k_stage = sm.stage(sm.k, s), v_stage = sm.stage(sm.v, s);
    const int n0 = tile * BN;
    mbarrier_wait(sm.full + 8 * s, (it / kStages) & 1);
    wgmma_fence_operands(acc_s);
    wgmma_fence_operands(acc_dp);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      wgmma_ss<Elem, BN, Major::kK, Major::kK>(acc_s, QTile::k_major(sm.q, wg_row0, kk),
                                               KVTile::k_major(k_stage, 0, kk), kk > 0);
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      wgmma_ss<Elem, BN, Major::kK, Major::kK>(acc_dp, QTile::k_major(sm.d_o, wg_row0, kk),
                                               KVTile::k_major(v_stage, 0, kk), kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(acc_s);
    wgmma_fence_operands(acc_dp);

    // dS = P (dP - delta) (1 - t^2); pairs of padding or out-of-sequence keys and pairs outside the window are
    // selected to 0 (interior tiles skip the test). Padding query rows are zeroed in the epilogue.
    TileBits<BN> bits;
    bits.load(blk.key_bits, n0, seq.len_k);
    const bool needs_mask = !bits.all() || !window_covers_tile(p, seq, blk.m0, Cfg::kBlockM, n0, BN);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        bool seen = true;
        if (needs_mask) {
          const int i = blk.m0 + warp_row0 + lane / 4 + 8 * (e / 2);
          const int bit = (nt % 4) * 8 + 2 * (lane % 4) + (e % 2);  // key n0 + 32 * (nt / 4) + bit
          seen = bits.test(nt / 4, bit) && in_window(p, seq, i, n0 + 32 * (nt / 4) + bit);
        }
        const float t = score.stored(acc_s[4 * nt + e]);
        const float prob = fast_exp2(score.log2_units(t) - row_lse2[e / 2]);
        acc_dp[4 * nt + e] = seen ? prob * (acc_dp[4 * nt + e] - row_delta[e / 2]) * score.derivative(t) : 0.f;
      }
    }
    uint32_t a_ds[BN / 16][4];  // dS as the A operand, 16 keys per k step
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) accumulator_cols_to_a<Elem>(a_ds[kk], acc_dp, kk);

    // dQ += dS K (k = the tile's keys).
    wgmma_fence_operands(acc_dq);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) wgmma_fence_operands(a_ds[kk]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      wgmma_rs<Elem, D, Major::kMN>(acc_dq, a_ds[kk], KVTile::mn_major(k_stage, kk), true);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(acc_dq);
    mbarrier_arrive(sm.empty + 8 * s);  // K and V of this stage are no longer read
  }

  // dQ staged through this warpgroup's own Q rows, once every warp's products have retired.
  named_barrier_sync(kDqConsumerBarrier0 + consumer, 128);
  uint32_t redo_rows;  // bit r: real row warp_row0 + r holds a non-finite value, maybe from 0 * NaN
  {
    bool flag[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = warp_row0 + lane / 4 + 8 * hf;
      const bool real = is_token(query_bits, blk.m0 + r, seq.len_q);  // a padding row sees no key: 0
      bool redo = false;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        const float x0 = acc_dq[4 * dt + 2 * hf], x1 = acc_dq[4 * dt + 2 * hf + 1];
        redo = redo || nonfinite(x0) || nonfinite(x1);
        store_pair<QTile, Elem>(sm.q, r, dt, real ? nan_if_infinite(x0 * p.scale) : 0.f,
                                real ? nan_if_infinite(x1 * p.scale) : 0.f);
      }
      // A NaN lse (a NaN or +inf score) makes every element NaN already, as it should.
      flag[hf] = redo && real && row_lse2[hf] == row_lse2[hf];
    }
    redo_rows = flagged_rows(flag[0], flag[1]);
  }
  __syncwarp();
  if (redo_rows != 0) {  // the exact slow path, over the rows' staged dQ
    const uint16_t* q = static_cast<const uint16_t*>(p.q) +
                        token_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, blk.b, token, blk.h);
    const uint16_t* d_o = static_cast<const uint16_t*>(p.dout) +
                          token_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, blk.b, token, blk.h);
    const uint16_t* k = static_cast<const uint16_t*>(p.k) +
                        token_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, blk.b, seq.k_token0, blk.hk);
    const uint16_t* v = static_cast<const uint16_t*>(p.v) +
                        token_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, blk.b, seq.k_token0, blk.hk);
#pragma unroll 1
    for (int wr = 0; wr < 16; ++wr) {
      if (!((redo_rows >> wr) & 1u)) continue;
      const int r = warp_row0 + wr;
      RowSlice<D> dq_row;
      seen_dq_row<Elem, D>(p, seq, score, blk.m0 + r, q + r * p.q_row_stride, d_o + r * p.do_row_stride, k, v,
                           blk.key_bits, ld_global_f32(p.lse_log2 + l_off + r), ld_global_f32(p.delta + l_off + r),
                           dq_row);
      store_row_slice<QTile, Elem, D>(sm.q, r, dq_row, p.scale);
    }
    __syncwarp();
  }
  copy_rows_to_global<QTile, 16>(sm.q, warp_row0, dq, p.dq_row_stride, blk.rows);
  // The Q tile (which staged dQ) and the dO tile go back to the producer; its next TMA load overwrites them.
  fence_proxy_async();
  mbarrier_arrive(sm.q_empty);
}

// A consumer warpgroup: every work tile of this block.
template <class Cfg>
__device__ __forceinline__ void consume_dq(const HopperBwdParams& hp, const HopperDqSmem<Cfg>& sm, int consumer) {
  using Work = BwdWorkTiles<Cfg::kBlockM, false>;
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  const BwdParams& p = hp.p;
  int it = 0, q_round = 0;
#pragma unroll 1
  for (int w = blockIdx.x; w < Work::total(p); w += hp.ctas) {
    int m_block, h, b;
    Work::coords(w, p, m_block, h, b);
    const HopperBlock<Cfg::kBlockM, Cfg::kBlockN> blk(p, m_block, h, b);
    if (blk.rows <= 0) continue;  // past the end of a shorter varlen sequence
    if (blk.t_first >= blk.t_hi) {
      write_zero_dq<Cfg>(p, blk, consumer);
    } else {
      consume_dq_tile<Cfg>(hp, blk, sm, consumer, it, q_round++);
    }
  }
}

// A persistent grid of hp.ctas blocks over the work tiles (query tile, query head, sequence).
template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) bwd_dq_sm90_kernel(const __grid_constant__ HopperBwdParams hp) {
  const HopperDqSmem<Cfg> sm(dynamic_smem());
  if (threadIdx.x == 0) {
    mbarrier_init(sm.q_full, 1);
    mbarrier_init(sm.q_empty, 128 * Cfg::kConsumers);
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbarrier_init(sm.full + 8 * s, 1);
      mbarrier_init(sm.empty + 8 * s, 128 * Cfg::kConsumers);
    }
    mbarrier_init_fence();
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    produce_dq<Cfg>(hp, sm);
  } else {
    consume_dq<Cfg>(hp, sm, static_cast<int>(threadIdx.x) / 128 - 1);
  }
}

}  // namespace l2vf
