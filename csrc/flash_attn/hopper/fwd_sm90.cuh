// The attention forward for Hopper (sm_90a) in the FlashAttention-3 structure: a persistent grid
// (one block per SM) whose blocks take turns at the work tiles (128-row query tile, query head,
// sequence), three warpgroups each.
//
// Warpgroup 0 is the producer: it gives its registers away (setmaxnreg) and one thread issues TMA
// loads of the Q tile and of the K and V tiles the block walks (tiles without a real key are never
// loaded) into a kStages-deep ring; each load completes on the stage's full mbarrier (transaction
// bytes), and a stage is reused once both consumers have arrived on its empty mbarrier; the ring and
// the Q tile (released by the consumers after their epilogue) carry over from one work tile to the next.
// Warpgroups 1 and 2 are the consumers, 64 query rows each, with the registers: per key tile
//   S = Q K^T      wgmma m64 n{kBlockN} k16, both operands from shared memory (K-major),
//   online softmax on the accumulators in log2 units: p = 2^(s * scale log2 e - m * scale log2 e), one FFMA,
//   O += P V       wgmma m64 n{kHeadDim} k16, P from registers (accumulator layout = A layout), V MN-major.
// The two consumers take turns on the tensor cores (pingpong): each issues its GEMMs only after the
// other has issued its own (named barriers), so one warpgroup's softmax overlaps the other's GEMMs.
// Inside a warpgroup, a turn issues the next tile's S and this tile's P V together, and the softmax
// of that S runs while P V is in flight (intra-warpgroup overlap).
// The epilogue is the sm80 kernel's (fwd_kernel.cuh): normalise, lse, the exact slow path for
// rows a 0 * NaN product may have poisoned, O staged through the warpgroup's own Q rows.
#pragma once

#include <cstdint>

#include "../block_info.cuh"
#include "../fwd_kernel.cuh"
#include "../opaque.cuh"
#include "../params.h"
#include "../ptx_sm90.cuh"
#include "../tile.cuh"
#include "../tma_host.h"
#include "tile_sm90.cuh"

namespace l2vf {

// Forward parameters with the tensor maps of q, k and v (4-D: head dim, token, head, sequence; a
// box is 64 columns x kBlockM or kBlockN rows of one head of one sequence).
struct HopperFwdParams {
  FwdParams p;
  TmaDescriptor tma_q, tma_k, tma_v;
  int ctas;  // the persistent grid's size: block c takes work tiles c, c + ctas, ...
};

template <class Elem_, int kHeadDim_, int kBlockN_, int kStages_>
struct HopperFwdConfig {
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_, kBlockN = kBlockN_, kStages = kStages_;
  static constexpr int kConsumers = 2;  // warpgroups of 64 query rows
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  // Producer and consumer register budgets after setmaxnreg (multiples of 8, 24..256): 128 x 24 + 256 x 240
  // = 64512 of the 65536 registers of an SM.
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  using QTile = SwizzledPanels<kBlockM, kHeadDim>;
  using KVTile = SwizzledPanels<kBlockN, kHeadDim>;
  static constexpr int kBoxBytesQ = QTile::kBytes;
  static constexpr int kBoxBytesKV = KVTile::kBytes;
  // Shared memory from a 1024-byte aligned base: Q, K stages, V stages, then the mbarriers
  // (q full, q empty; per stage k full, v full, empty), 8 bytes each.
  static constexpr int kOffK = QTile::kBytes;
  static constexpr int kOffV = kOffK + kStages * KVTile::kBytes;
  static constexpr int kOffBarriers = kOffV + kStages * KVTile::kBytes;
  static constexpr int kSmemBytes = 1024 + kOffBarriers + 8 * (2 + 3 * kStages);

  static_assert(kHeadDim % 64 == 0 && kHeadDim <= 256, "wgmma n = head dim, whole 64-column panels");
  static_assert(kBlockN % 32 == 0 && 128 % kBlockN == 0, "key tiles cover whole words of the mask bits");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "wgmma n = kBlockN");
  static_assert(kStages >= 2, "the ring needs at least double buffering");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one sm_90 block");
};

// Named barriers (0 is __syncthreads): the consumers' turns on the tensor cores, and each
// consumer warpgroup's own barrier.
constexpr int kTurnBarrier0 = 1;     // + consumer index
constexpr int kConsumerBarrier0 = 3;  // + consumer index

// The persistent schedule: work tile w is query block n_m - 1 - w % n_m (under causal masks and windows
// the longest key ranges go first), query head (w / n_m) % heads_q, sequence w / (n_m heads_q).
// Computed from the parameters at each use (they stay in parameter space, not in registers).
template <int kBlockM>
struct WorkTiles {
  __host__ __device__ __forceinline__ static int total(const FwdParams& p) {
    return ceil_div(p.seqlen_q, kBlockM) * p.heads_q * p.batch;
  }
  __device__ __forceinline__ static void coords(int w, const FwdParams& p, int& m_block, int& h, int& b) {
    const int n_m = ceil_div(p.seqlen_q, kBlockM);
    m_block = n_m - 1 - w % n_m;
    h = (w / n_m) % p.heads_q;
    b = w / n_m / p.heads_q;
  }
};

// Where a work tile's queries, heads and sequence live, and the key tiles it walks; the same in
// every thread (the producer and consumers walk one sequence of tiles). Also the Hopper dQ kernel's
// (bwd_dq_sm90.cuh), hence AttnParams.
template <int kBlockM, int kBlockN>
struct HopperBlock {
  SeqSlice seq;
  int h, hk, b;
  int m0, rows;  // rows <= 0: the tile lies past the sequence's end
  const uint32_t* key_bits;
  int t_first, t_hi;  // key tiles [t_first, t_hi), those without a real key skipped

  __device__ __forceinline__ HopperBlock(const AttnParams& p, int m_block, int h_, int b_)
      : seq(seq_slice(p, b_)), h(h_), hk(h_ / p.group), b(b_), m0(m_block * kBlockM) {
    rows = min(kBlockM, seq.len_q - m0);
    key_bits = p.key_bits != nullptr ? p.key_bits + static_cast<int64_t>(b) * p.key_bits_stride : nullptr;
    t_first = t_hi = 0;
    if (rows <= 0) return;
    int n_lo, n_hi;
    visible_keys(p, seq, m0, rows, n_lo, n_hi);
    tile_walk<kBlockM, kBlockN>(n_lo, n_hi, query_bits(p), m0, key_bits, t_first, t_hi);
  }
  // The mask bits of the query rows, when the key mask marks them too (recomputed, not kept in registers).
  __device__ __forceinline__ const uint32_t* query_bits(const AttnParams& p) const {
    return p.query_rows_masked ? key_bits : nullptr;
  }
  __device__ __forceinline__ int after(int tile) const {
    return next_tile_with_tokens<kBlockN>(key_bits, tile + 1, t_hi);
  }
  // The sequence coordinate of the tensor maps (varlen tensors are one sequence of packed tokens).
  __device__ __forceinline__ int batch_coord(const AttnParams& p) const { return p.cu_seqlens_q != nullptr ? 0 : b; }
};

// The block's rows of q, out and lse, and its sequence's k and v (kv head hk): what the epilogue touches.
struct BlockPointers {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  float* lse;
};

template <int kBlockM, int kBlockN>
__device__ __forceinline__ BlockPointers block_pointers(const FwdParams& p, const HopperBlock<kBlockM, kBlockN>& blk) {
  const SeqSlice& s = blk.seq;
  BlockPointers r;
  r.q = static_cast<const uint16_t*>(p.q) +
        token_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, blk.b, s.q_token0 + blk.m0, blk.h);
  r.k = static_cast<const uint16_t*>(p.k) +
        token_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, blk.b, s.k_token0, blk.hk);
  r.v = static_cast<const uint16_t*>(p.v) +
        token_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, blk.b, s.k_token0, blk.hk);
  r.out = static_cast<uint16_t*>(p.out) +
          token_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, blk.b, s.q_token0 + blk.m0, blk.h);
  r.lse = p.lse + lse_offset(p, blk.b, blk.h, s.q_token0 + blk.m0);
  return r;
}

// Shared-window addresses of the block's tiles and mbarriers.
template <class Cfg>
struct HopperSmem {
  uint32_t q, k, v;  // k and v: kStages tiles each
  uint32_t q_full, q_empty, k_full, v_full, empty;  // k_full .. empty: kStages barriers each, 8 bytes apart

  __device__ __forceinline__ explicit HopperSmem(uint32_t base) {
    const uint32_t aligned = (base + 1023u) & ~1023u;
    q = aligned;
    k = aligned + Cfg::kOffK;
    v = aligned + Cfg::kOffV;
    q_full = aligned + Cfg::kOffBarriers;
    q_empty = q_full + 8;
    k_full = q_empty + 8;
    v_full = k_full + 8 * Cfg::kStages;
    empty = v_full + 8 * Cfg::kStages;
  }
  __device__ __forceinline__ uint32_t stage(uint32_t ring, int s) const {
    return ring + static_cast<uint32_t>(s * Cfg::KVTile::kBytes);
  }
};

// The producer: one thread loads, per work tile of this block that sees a key, its Q (once the
// consumers have released the Q tile, which also stages the previous tile's O) and every key tile
// it walks into the ring; the ring's stage and phase run on across work tiles.
template <class Cfg>
__device__ __forceinline__ void produce(const HopperFwdParams& hp, const HopperSmem<Cfg>& sm) {
  constexpr int BN = Cfg::kBlockN, kPanels = Cfg::QTile::kPanels, kStages = Cfg::kStages;
  setmaxnreg_dec<Cfg::kProducerRegs>();
  if (threadIdx.x != 0) return;
  const FwdParams& p = hp.p;
  int it = 0, q_round = 0;
#pragma unroll 1
  for (int w = blockIdx.x; w < WorkTiles<Cfg::kBlockM>::total(p); w += hp.ctas) {
    int m_block, h, b;
    WorkTiles<Cfg::kBlockM>::coords(w, p, m_block, h, b);
    const HopperBlock<Cfg::kBlockM, Cfg::kBlockN> blk(p, m_block, h, b);
    if (blk.t_first >= blk.t_hi) continue;  // no key to load (the consumers write zeros)
    const int bc = blk.batch_coord(p);
    // A fresh barrier counts as having completed the phase before its first: the first wait passes at once.
    mbarrier_wait(sm.q_empty, (q_round++ & 1) ^ 1);
    mbarrier_arrive_expect_tx(sm.q_full, Cfg::kBoxBytesQ);
#pragma unroll
    for (int panel = 0; panel < kPanels; ++panel) {
      tma_load_4d(sm.q + panel * Cfg::QTile::kPanelBytes, hp.tma_q, sm.q_full, 64 * panel, blk.seq.q_token0 + blk.m0,
                  blk.h, bc);
    }
#pragma unroll 1
    for (int tile = blk.t_first; tile < blk.t_hi; ++it, tile = blk.after(tile)) {
      const int s = it % kStages;
      mbarrier_wait(sm.empty + 8 * s, ((it / kStages) & 1) ^ 1);
      const int token = blk.seq.k_token0 + tile * BN;
      mbarrier_arrive_expect_tx(sm.k_full + 8 * s, Cfg::kBoxBytesKV);
#pragma unroll
      for (int panel = 0; panel < kPanels; ++panel) {
        tma_load_4d(sm.stage(sm.k, s) + panel * Cfg::KVTile::kPanelBytes, hp.tma_k, sm.k_full + 8 * s, 64 * panel,
                    token, blk.hk, bc);
      }
      mbarrier_arrive_expect_tx(sm.v_full + 8 * s, Cfg::kBoxBytesKV);
#pragma unroll
      for (int panel = 0; panel < kPanels; ++panel) {
        tma_load_4d(sm.stage(sm.v, s) + panel * Cfg::KVTile::kPanelBytes, hp.tma_v, sm.v_full + 8 * s, 64 * panel,
                    token, blk.hk, bc);
      }
    }
  }
}

// Online softmax state of the two rows a thread holds (g and g + 8 of its warp's 16).
struct RowStats {
  float max[2];  // in the units of the stored scores (raw, or log2 units under a soft cap)
  float sum[2];  // this thread's partial sums; reduced across the quad at the end
};

// One consumer warpgroup on one work tile: its 64 query rows against every key tile, then the epilogue;
// `it` counts the ring's tiles across work tiles, q_round the Q tiles.
template <class Cfg>
__device__ __forceinline__ void consume_tile(const HopperFwdParams& hp,
                                             const HopperBlock<Cfg::kBlockM, Cfg::kBlockN>& blk,
                                             const HopperSmem<Cfg>& sm, int consumer, int& it, int q_round) {
  using Elem = typename Cfg::Elem;
  using QTile = typename Cfg::QTile;
  using KVTile = typename Cfg::KVTile;
  constexpr int D = Cfg::kHeadDim, BN = Cfg::kBlockN, kStages = Cfg::kStages;
  constexpr int kNT = BN / 8, kDT = D / 8;  // n8 column tiles of S and of O
  const FwdParams& p = hp.p;
  const int thread = static_cast<int>(threadIdx.x) % 128;
  const int warp = thread / 32, lane = thread % 32;
  const int wg_row0 = 64 * consumer;           // first row of this warpgroup within the block's tile
  const int warp_row0 = wg_row0 + 16 * warp;   // first row of this warp

  // Scores: raw (scale folded into the exponent's FFMA), or under a soft cap t = tanh(s * scale / softcap)
  // kept as x = softcap * log2(e) * t (log2 units, exponent multiplier 1).
  const bool capped = p.softcap > 0.f;
  const float cap_mul = p.scale / p.softcap, cap_log2 = p.softcap * kLog2e;
  const float exp_mul = capped ? 1.f : p.scale * kLog2e;

  float acc_o[D / 2];  // n8 tile dt: acc_o[4 dt .. 4 dt + 3], the mma.sync C layout
  RowStats stats;
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_o[4 * dt + e] = 0.f;
  }
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    stats.max[hf] = -INFINITY;
    stats.sum[hf] = 0.f;
  }

  // Turns on the tensor cores alternate between the two consumers; the first takes the first one.
  const int other = 1 - consumer;
  const auto take_turn = [&] { named_barrier_sync(kTurnBarrier0 + consumer, 256); };
  const auto pass_turn = [&] { named_barrier_arrive(kTurnBarrier0 + other, 256); };
  if (consumer == 1) pass_turn();
  mbarrier_wait(sm.q_full, q_round & 1);

  float acc_s[BN / 2];  // S, then P of one key tile; n8 tile nt: acc_s[4 nt .. 4 nt + 3]
  uint32_t a_p[BN / 16][4];  // P as the A operand of P V, 16 keys per k step

  // S = Q K^T of the tile in stage s (one commit group).
  const auto issue_s = [&](int s) {
    const uint32_t k_stage = sm.stage(sm.k, s);
    wgmma_fence_operands(acc_s);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      wgmma_ss<Elem, BN, Major::kK, Major::kK>(acc_s, QTile::k_major(sm.q, wg_row0, kk),
                                               KVTile::k_major(k_stage, 0, kk), kk > 0);
    }
    wgmma_commit();
  };
  // O += P V of the tile in stage s (one commit group).
  const auto issue_pv = [&](int s) {
    const uint32_t v_stage = sm.stage(sm.v, s);
    wgmma_fence_operands(acc_o);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) wgmma_fence_operands(a_p[kk]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      wgmma_rs<Elem, D, Major::kMN>(acc_o, a_p[kk], KVTile::mn_major(v_stage, kk), true);
    }
    wgmma_commit();
  };
  // S of key tile `tile` to P in place: soft cap, mask (keys that are padding, past the sequence or outside
  // the window; interior tiles skip it), new row max, P = 2^(s * mul - max * mul), row sums; `correction`
  // gets the factor that rescales what O accumulated under the old max.
  const auto softmax = [&](int tile, float (&correction)[2]) {
    const int n0 = tile * BN;
    if (capped) {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) acc_s[i] = cap_log2 * accurate_tanh(acc_s[i] * cap_mul);
    }
    TileBits<BN> bits;
    bits.load(blk.key_bits, n0, blk.seq.len_k);
    if (!bits.all() || !window_covers_tile(p, blk.seq, blk.m0, Cfg::kBlockM, n0, BN)) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = blk.m0 + warp_row0 + lane / 4 + 8 * (e / 2);
          const int bit = (nt % 4) * 8 + 2 * (lane % 4) + (e % 2);  // key n0 + 32 * (nt / 4) + bit
          const int j = n0 + 32 * (nt / 4) + bit;
          if (!bits.test(nt / 4, bit) || !in_window(p, blk.seq, i, j)) acc_s[4 * nt + e] = -INFINITY;
        }
      }
    }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float mx = stats.max[hf];
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(acc_s[4 * nt + 2 * hf], acc_s[4 * nt + 2 * hf + 1]));
      mx = fmaxf(mx, warp_shfl_xor(mx, 1));  // the 4 lanes of a quad share a row
      mx = fmaxf(mx, warp_shfl_xor(mx, 2));
      // A row that has seen only masked keys keeps max -inf; subtract 0 instead (no -inf - -inf).
      const float m_scaled = (mx == -INFINITY ? 0.f : mx) * exp_mul;
      correction[hf] = fast_exp2(stats.max[hf] * exp_mul - m_scaled);  // 0 while the old max is -inf
      stats.max[hf] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 2 * hf; e < 2 * hf + 2; ++e) {
          acc_s[4 * nt + e] = fast_exp2(fmaf(acc_s[4 * nt + e], exp_mul, -m_scaled));
          sum += acc_s[4 * nt + e];
        }
      }
      stats.sum[hf] = stats.sum[hf] * correction[hf] + sum;
    }
  };
  const auto rescale_o = [&](const float (&correction)[2]) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[4 * dt + e] *= correction[e / 2];
    }
  };
  const auto p_to_a = [&] {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) accumulator_cols_to_a<Elem>(a_p[kk], acc_s, kk);
  };

  // Intra-warpgroup overlap: each turn issues the next tile's S and this tile's P V, and the softmax of
  // that S runs while P V is in flight; O is rescaled once P V has retired. Ring tile i sits in stage i % kStages.
  float correction[2];
  int tile = blk.t_first;
  mbarrier_wait(sm.k_full + 8 * (it % kStages), (it / kStages) & 1);
  take_turn();
  issue_s(it % kStages);
  pass_turn();
  wgmma_wait<0>();
  wgmma_fence_operands(acc_s);
  softmax(tile, correction);  // O is still zero: nothing to rescale
  p_to_a();
#pragma unroll 1
  for (int next = blk.after(tile); next < blk.t_hi; tile = next, next = blk.after(tile)) {
    const int prev = it % kStages;
    const uint32_t prev_phase = (it / kStages) & 1;
    ++it;
    const int s = it % kStages;
    mbarrier_wait(sm.k_full + 8 * s, (it / kStages) & 1);
    mbarrier_wait(sm.v_full + 8 * prev, prev_phase);
    take_turn();
    issue_s(s);
    issue_pv(prev);
    pass_turn();
    wgmma_wait<1>();  // S has retired, P V may still run
    wgmma_fence_operands(acc_s);
    softmax(next, correction);
    wgmma_wait<0>();
    wgmma_fence_operands(acc_o);
    mbarrier_arrive(sm.empty + 8 * prev);  // K and V of the previous tile are no longer read
    rescale_o(correction);
    p_to_a();
  }
  const int last = it % kStages;
  mbarrier_wait(sm.v_full + 8 * last, (it / kStages) & 1);
  take_turn();
  issue_pv(last);
  if (consumer == 0) pass_turn();  // the second consumer's last turn has no taker
  wgmma_wait<0>();
  wgmma_fence_operands(acc_o);
  mbarrier_arrive(sm.empty + 8 * last);
  ++it;

  // Normalise; padded query rows (and rows that saw no key) get zeros and lse = -inf. Every wgmma
  // of the warpgroup has read its Q rows before they are overwritten with O.
  named_barrier_sync(kConsumerBarrier0 + consumer, 128);
  // The epilogue's shared addresses derive from opaque values (the tile and, below, the warp's first row)
  // so that they are recomputed per work tile: hoisted out of the persistent loop, they would stay live
  // in registers across it and spill.
  const uint32_t o_tile = opaque(sm.q);
  const BlockPointers outs = block_pointers(p, blk);
  uint32_t redo_rows = 0;  // bit r: row warp_row0 + r holds a non-finite value, maybe from 0 * NaN
  bool redo[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float sum = stats.sum[hf];
    sum += warp_shfl_xor(sum, 1);
    sum += warp_shfl_xor(sum, 2);
    const int r = warp_row0 + lane / 4 + 8 * hf;  // row within the tile
    const bool valid = is_token(blk.query_bits(p), blk.m0 + r, blk.seq.len_q);
    // sum is 0 exactly on rows that saw no key or only -inf scores, NaN on rows with a NaN or +inf score.
    // Zeros are selected, not multiplied in: acc may hold NaN from a padding row's own q.
    const bool row_ok = valid && sum != 0.f;
    const float inv = 1.f / sum;
    const float row_lse = row_ok ? (stats.max[hf] * exp_mul + log2f(sum)) * kLn2 : -INFINITY;
    if (lane % 4 == 0 && r < blk.rows) st_global_f32(outs.lse + r, row_lse);
    bool row_nonfinite = false;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      row_nonfinite = row_nonfinite || nonfinite(acc_o[4 * dt + 2 * hf]) || nonfinite(acc_o[4 * dt + 2 * hf + 1]);
      store_pair<QTile, Elem>(o_tile, r, dt, row_ok ? nan_if_infinite(acc_o[4 * dt + 2 * hf] * inv) : 0.f,
                              row_ok ? nan_if_infinite(acc_o[4 * dt + 2 * hf + 1] * inv) : 0.f);
    }
    // A NaN sum (a NaN or +inf score) makes every element NaN already, as it should.
    redo[hf] = row_ok && sum == sum && row_nonfinite;
  }
  redo_rows = flagged_rows(redo[0], redo[1]);
  __syncwarp();
  if (redo_rows != 0) {  // the exact slow path, over the rows' staged output (lse is exact already)
    const ScoreTransform score(p);
#pragma unroll 1
    for (int wr = 0; wr < 16; ++wr) {
      if (!((redo_rows >> wr) & 1u)) continue;
      const int r = warp_row0 + wr;
      RowSlice<D> o;
      seen_output_row<Elem, D>(p, blk.seq, score, blk.m0 + r, outs.q + r * p.q_row_stride, outs.k, outs.v,
                               blk.key_bits, ld_global_f32(outs.lse + r) * kLog2e, o);
      store_row_slice<QTile, Elem, D>(o_tile, r, o, 1.f);
    }
    __syncwarp();
  }
  copy_rows_to_global<QTile, 16>(o_tile, static_cast<int>(opaque(warp_row0)), outs.out, p.o_row_stride, blk.rows);
  // The Q tile (which staged O) goes back to the producer; its next TMA load overwrites these stores.
  fence_proxy_async();
  mbarrier_arrive(sm.q_empty);
}

// Rows of a work tile that see no key: zeros and lse = -inf, this consumer's 64 of them.
template <class Cfg>
__device__ __forceinline__ void write_empty_rows(const FwdParams& p, const HopperBlock<Cfg::kBlockM, Cfg::kBlockN>& blk,
                                                 int consumer) {
  constexpr int kChunks = Cfg::kHeadDim / 8;
  const BlockPointers outs = block_pointers(p, blk);
  // thread is opaque for the reason given in consume_tile's epilogue.
  const int r0 = 64 * consumer, rows = min(64, blk.rows - r0), thread = static_cast<int>(opaque(threadIdx.x) % 128);
  for (int idx = thread; idx < rows * kChunks; idx += 128) {
    st_global_16(outs.out + (r0 + idx / kChunks) * p.o_row_stride + (idx % kChunks) * 8, make_uint4(0u, 0u, 0u, 0u));
  }
  for (int r = thread; r < rows; r += 128) st_global_f32(outs.lse + r0 + r, -INFINITY);
}

// A consumer warpgroup: every work tile of this block.
template <class Cfg>
__device__ __forceinline__ void consume(const HopperFwdParams& hp, const HopperSmem<Cfg>& sm, int consumer) {
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  const FwdParams& p = hp.p;
  int it = 0, q_round = 0;
#pragma unroll 1
  for (int w = blockIdx.x; w < WorkTiles<Cfg::kBlockM>::total(p); w += hp.ctas) {
    int m_block, h, b;
    WorkTiles<Cfg::kBlockM>::coords(w, p, m_block, h, b);
    const HopperBlock<Cfg::kBlockM, Cfg::kBlockN> blk(p, m_block, h, b);
    if (blk.rows <= 0) continue;  // past the end of a shorter varlen sequence
    if (blk.t_first >= blk.t_hi) {
      write_empty_rows<Cfg>(p, blk, consumer);
    } else {
      consume_tile<Cfg>(hp, blk, sm, consumer, it, q_round++);
    }
  }
}

// A persistent grid of hp.ctas blocks over the work tiles (query tile, query head, sequence).
template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) fwd_sm90_kernel(const __grid_constant__ HopperFwdParams hp) {
  const HopperSmem<Cfg> sm(dynamic_smem());
  if (threadIdx.x == 0) {
    mbarrier_init(sm.q_full, 1);
    mbarrier_init(sm.q_empty, 128 * Cfg::kConsumers);
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbarrier_init(sm.k_full + 8 * s, 1);
      mbarrier_init(sm.v_full + 8 * s, 1);
      mbarrier_init(sm.empty + 8 * s, 128 * Cfg::kConsumers);
    }
    mbarrier_init_fence();
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    produce<Cfg>(hp, sm);
  } else {
    consume<Cfg>(hp, sm, static_cast<int>(threadIdx.x) / 128 - 1);
  }
}

}  // namespace l2vf
