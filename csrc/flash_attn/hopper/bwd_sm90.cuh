// The attention backward's dK/dV kernel for Hopper (sm_90a) in the FlashAttention-3 structure, with
// dQ added by float atomics (kAtomicDq: the fast path, whose float32 sums depend on the order the blocks
// add in) or without dQ (the deterministic path, whose dQ is bwd_dq_sm90.cuh's, one writer per element).
// The preprocess (delta, lse in log2 units) is the sm80 kernel's.
//
// A persistent grid of hp.ctas blocks (at most one per SM) over the work tiles (key tile of kBlockN keys, kv head,
// sequence) in BwdWorkTiles' order: block c takes tiles c, c + ctas, ..., tiles past a sequence's end skipped in a
// few instructions by the producer and the consumers alike. Three warpgroups. Warpgroup 0
// is the producer: it gives its registers away (setmaxnreg) and, per work tile, one thread loads K and V
// (once the consumers have released the previous tile's, which staged its dK and dV: kv_empty), then for
// every query tile that sees these keys and every query head of the GQA group the Q and dO tiles by TMA
// into a kStages-deep ring, while its first kBlockM threads copy the tile's lse2 and delta rows into the
// same stage (one full mbarrier per stage: their arrivals and the TMA transaction bytes; a stage is reused
// once both consumers have arrived on its empty mbarrier). The ring's stage and phase and the K/V barriers'
// phases run on across work tiles. Warpgroups 1 and 2 are the consumers, 64 keys each; per query tile,
// with their keys as the wgmma rows:
//   S^T = K Q^T, dP^T = V dO^T      wgmma m64 n{kBlockM} k16, both operands K-major in shared memory,
//   P^T = 2^(S^T log2 - lse2), dS^T = P^T (dP^T - delta)  in registers (the accumulator layout is
//   the A layout of an RS wgmma), unseen pairs selected to 0,
//   dV += P^T dO, dK += dS^T Q        wgmma m64 n{kHeadDim} k16, A from registers, dO / Q MN-major,
//   dQ_part = dS K_own               (kAtomicDq) dS^T stored to the warpgroup's own shared tile
//                                    (fence.proxy.async), read as an MN-major A; K MN-major; added to
//                                    p.dq_accum with red.global.add (each consumer adds its 64 keys' share).
// (lse2 and delta are not TMA-loaded: their rows are 4-byte aligned only, where TMA needs 16 bytes.)
// Non-finite values: TMA loads padding and out-of-sequence rows as they are (no zero fill), so 0 * NaN
// may reach an accumulator; as in the sm80 kernel, flagged dQ elements and dK/dV rows are recomputed
// exactly (fwd_kernel.cuh's slow path).
#pragma once

#include <cstdint>
#include <cstring>

#include "../block_info.cuh"
#include "../bwd_kernels.cuh"
#include "../fwd_kernel.cuh"
#include "../opaque.cuh"
#include "../params.h"
#include "../ptx_sm90.cuh"
#include "../tile.cuh"
#include "../tma_host.h"
#include "tile_sm90.cuh"

namespace l2vf {

// Backward parameters with the tensor maps of q, dout (boxes of kBlockM rows) and k, v (kBlockN rows).
struct HopperBwdParams {
  BwdParams p;
  TmaDescriptor tma_q, tma_do, tma_k, tma_v;
  int ctas;  // the persistent grid's size: block c takes work tiles c, c + ctas, ...
};

// The persistent schedule of both Hopper backward kernels, over tiles of kRows keys (kOverKeys: the dK/dV
// kernel's, per kv head) or queries (the dQ kernel's, per query head): work tile w is tile index w / lanes of
// lane w % lanes = (head, sequence), lanes = heads x batch, so that each round of ctas blocks takes the same
// tile index of many sequences. Tiles that see the most go first under causal masks: key tiles in ascending
// order (key tile 0 sees every query), query tiles in descending order (the last sees every key); in a packed
// batch of short sequences the real tiles (low indices) thus spread evenly over the blocks, while an order
// with the tile index innermost would give block c only tile index c mod tiles. Computed from the
// parameters at each use (they stay in parameter space, not in registers).
template <int kRows, bool kOverKeys>
struct BwdWorkTiles {
  __host__ __device__ __forceinline__ static int tiles(const AttnParams& p) {
    return ceil_div(kOverKeys ? p.seqlen_k : p.seqlen_q, kRows);
  }
  __host__ __device__ __forceinline__ static int heads(const AttnParams& p) {
    return kOverKeys ? p.heads_kv : p.heads_q;
  }
  __host__ __device__ __forceinline__ static int total(const AttnParams& p) { return tiles(p) * heads(p) * p.batch; }
  __device__ __forceinline__ static void coords(int w, const AttnParams& p, int& tile, int& head, int& b) {
    const int lanes = heads(p) * p.batch, t = w / lanes;
    tile = kOverKeys ? t : tiles(p) - 1 - t;
    head = w % heads(p);
    b = (w % lanes) / heads(p);
  }
};

template <class Elem_, int kHeadDim_, int kBlockM_, int kStages_>
struct HopperBwdConfig {
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kStages = kStages_;
  static constexpr int kConsumers = 2;  // warpgroups of 64 keys
  static constexpr int kBlockN = 64 * kConsumers;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  // After setmaxnreg: 128 x 32 + 256 x 240 = the 65536 registers of an SM (the producer's persistent loop state
  // does not fit the forward's 24).
  static constexpr int kProducerRegs = 32, kConsumerRegs = 240;
  using QTile = SwizzledPanels<kBlockM, kHeadDim>;   // Q and dO
  using KVTile = SwizzledPanels<kBlockN, kHeadDim>;  // K and V, then dK and dV staged
  using DSTile = SwizzledPanels<64, kBlockM>;        // one consumer's dS^T: [key][query]
  static constexpr int kBoxBytesQ = QTile::kBytes;
  static constexpr int kBoxBytesKV = KVTile::kBytes;
  // From a 1024-byte aligned base: K, V, Q stages, dO stages, dS^T per consumer, lse2 and delta stages
  // (kBlockM floats each), the consumers' loop state (8 bytes per thread), then the mbarriers (kv full, kv empty;
  // per stage full, empty), 8 bytes each.
  static constexpr int kOffV = KVTile::kBytes;
  static constexpr int kOffQ = 2 * KVTile::kBytes;
  static constexpr int kOffDo = kOffQ + kStages * QTile::kBytes;
  static constexpr int kOffDs = kOffDo + kStages * QTile::kBytes;
  static constexpr int kOffLse = kOffDs + kConsumers * DSTile::kBytes;
  static constexpr int kOffDelta = kOffLse + kStages * kBlockM * 4;
  static constexpr int kOffLoopState = kOffDelta + kStages * kBlockM * 4;
  static constexpr int kOffBarriers = kOffLoopState + 128 * kConsumers * 8;
  static constexpr int kSmemBytes = 1024 + kOffBarriers + 8 * (2 + 2 * kStages);

  static_assert(kHeadDim % 64 == 0 && kHeadDim <= 256, "wgmma n = head dim, whole 64-column panels");
  static_assert(kBlockM % 64 == 0 && 128 % kBlockM == 0, "query tiles: whole panels of dS^T, whole mask words");
  static_assert(kStages >= 2, "the ring needs at least double buffering");
  static_assert(kBlockM <= 128, "one producer thread per query row copies its lse2 and delta");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory of one sm_90 block");
};

constexpr int kBwdConsumerBarrier0 = 1;  // + consumer index: each consumer warpgroup's own barrier

// Shared-window addresses of the block's tiles and mbarriers.
template <class Cfg>
struct HopperBwdSmem {
  uint32_t k, v, q, d_o, ds;     // q, d_o: kStages tiles each; ds: one tile per consumer
  uint32_t lse, delta;            // kStages rows of kBlockM floats each
  uint32_t loop_state;            // (work tile, kv_round) of each consumer thread
  uint32_t kv_full, kv_empty, full, empty;  // full, empty: kStages barriers each, 8 bytes apart

  __device__ __forceinline__ explicit HopperBwdSmem(uint32_t base) {
    const uint32_t aligned = (base + 1023u) & ~1023u;
    k = aligned;
    v = aligned + Cfg::kOffV;
    q = aligned + Cfg::kOffQ;
    d_o = aligned + Cfg::kOffDo;
    ds = aligned + Cfg::kOffDs;
    lse = aligned + Cfg::kOffLse;
    delta = aligned + Cfg::kOffDelta;
    loop_state = aligned + Cfg::kOffLoopState;
    kv_full = aligned + Cfg::kOffBarriers;
    kv_empty = kv_full + 8;
    full = kv_empty + 8;
    empty = full + 8 * Cfg::kStages;
  }
  __device__ __forceinline__ uint32_t stage(uint32_t ring, int s) const {
    return ring + static_cast<uint32_t>(s * Cfg::QTile::kBytes);
  }
  __device__ __forceinline__ uint32_t row_stage(uint32_t rows, int s) const {
    return rows + static_cast<uint32_t>(s * Cfg::kBlockM * 4);
  }
  // This consumer thread's loop-state slot (the thread index opaque: recomputed at each use, never kept live).
  __device__ __forceinline__ uint32_t loop_state_slot() const { return loop_state + 8 * (opaque(threadIdx.x) - 128); }
};

__device__ __forceinline__ void st_shared_f32(uint32_t addr, float value) {
  uint32_t bits;
  memcpy(&bits, &value, 4);
  st_shared_u32(addr, bits);
}

// This thread's place among the consumers, from an opaque thread index: built where it is used (per work tile, per
// query tile, in the epilogue), so that what derives from it is recomputed there instead of staying live across the
// persistent and query-tile loops, where the accumulators leave no registers for it.
struct BwdConsumerThread {
  int consumer, warp, lane;  // consumer warpgroup (0 or 1), warp within it, lane

  __device__ __forceinline__ BwdConsumerThread() {
    const int t = static_cast<int>(opaque(threadIdx.x));
    consumer = t / 128 - 1;
    warp = (t / 32) % 4;
    lane = t % 32;
  }
  __device__ __forceinline__ int thread() const { return 32 * warp + lane; }  // within the warpgroup
  __device__ __forceinline__ int krow0() const { return 64 * consumer; }      // first key within the block's tile
  __device__ __forceinline__ int warp_key0() const { return krow0() + 16 * warp; }
};

// The block's key tile, kv head and sequence, and the query tiles [t_first, t_hi) that see its keys
// (those without a real query skipped), each taken once per query head of the group; the same in every thread.
template <int kBlockM, int kBlockN>
struct HopperBwdBlock {
  SeqSlice seq;
  int hk, b, n0, cols;  // cols <= 0: the key tile lies past the sequence's end
  const uint32_t* key_bits;
  int t_first, t_hi;

  __device__ __forceinline__ HopperBwdBlock(const BwdParams& p, int n_block, int hk_, int b_)
      : seq(seq_slice(p, b_)), hk(hk_), b(b_), n0(n_block * kBlockN) {
    cols = min(kBlockN, seq.len_k - n0);
    key_bits = p.key_bits != nullptr ? p.key_bits + static_cast<int64_t>(b) * p.key_bits_stride : nullptr;
    t_first = t_hi = 0;
    if (cols <= 0) return;
    int m_lo, m_hi;
    visible_queries(p, seq, n0, cols, m_lo, m_hi);
    tile_walk<kBlockN, kBlockM>(m_lo, m_hi, key_bits, n0, query_bits(p), t_first, t_hi);
  }
  __device__ __forceinline__ const uint32_t* query_bits(const BwdParams& p) const {
    return p.query_rows_masked ? key_bits : nullptr;
  }
  __device__ __forceinline__ int after(const BwdParams& p, int tile) const {
    return next_tile_with_tokens<kBlockM>(query_bits(p), tile + 1, t_hi);
  }
  // t_hi (when some query sees the tile) found again from an opaque n0: the consumers' query-tile loop ends there
  // without keeping it live across its body, where it spilled.
  __device__ __forceinline__ int fresh_t_hi(const BwdParams& p) const {
    const int n = static_cast<int>(opaque(n0));
    int m_lo, m_hi;
    visible_queries(p, seq, n, min(kBlockN, seq.len_k - n), m_lo, m_hi);
    return ceil_div(m_hi, kBlockM);
  }
  // after(p, tile) with t_hi found again; end becomes t_hi.
  __device__ __forceinline__ int fresh_after(const BwdParams& p, int tile, int& end) const {
    end = fresh_t_hi(p);
    return next_tile_with_tokens<kBlockM>(query_bits(p), tile + 1, end);
  }
  __device__ __forceinline__ int batch_coord(const BwdParams& p) const { return p.cu_seqlens_q != nullptr ? 0 : b; }
};

// One work tile of the producer (some query sees its keys): thread 0 loads K and V once the consumers have
// released the previous work tile's (kv_round: the work tiles this block has loaded), then Q and dO of every
// (query tile, query head) of the walk; threads 0 .. kBlockM-1 copy that tile's lse2 and delta (row = thread;
// +inf and 0 past the sequence). `it` counts the ring's tiles across work tiles.
template <class Cfg>
__device__ __forceinline__ void produce_bwd_tile(const HopperBwdParams& hp, const HopperBwdSmem<Cfg>& sm,
                                                 const HopperBwdBlock<Cfg::kBlockM, Cfg::kBlockN>& blk, int row,
                                                 int& it, int kv_round) {
  constexpr int kPanels = Cfg::QTile::kPanels, kStages = Cfg::kStages;
  const BwdParams& p = hp.p;
  const int bc = blk.batch_coord(p);
  if (row == 0) {
    // A fresh barrier counts as having completed the phase before its first: the first wait passes at once.
    mbarrier_wait(sm.kv_empty, (kv_round & 1) ^ 1);
    const int key_token = blk.seq.k_token0 + blk.n0;
    mbarrier_arrive_expect_tx(sm.kv_full, 2 * Cfg::kBoxBytesKV);
#pragma unroll
    for (int panel = 0; panel < kPanels; ++panel) {
      const uint32_t off = panel * Cfg::KVTile::kPanelBytes;
      tma_load_4d(sm.k + off, hp.tma_k, sm.kv_full, 64 * panel, key_token, blk.hk, bc);
      tma_load_4d(sm.v + off, hp.tma_v, sm.kv_full, 64 * panel, key_token, blk.hk, bc);
    }
  }
#pragma unroll 1
  for (int tile = blk.t_first; tile < blk.t_hi; tile = blk.after(p, tile)) {
#pragma unroll 1
    for (int c = 0; c < p.group; ++c, ++it) {
      const int h = blk.hk * p.group + c;
      const int s = it % kStages;
      mbarrier_wait(sm.empty + 8 * s, ((it / kStages) & 1) ^ 1);
      const int m0 = tile * Cfg::kBlockM;
      const bool in_seq = m0 + row < blk.seq.len_q;
      const int64_t l_off = lse_offset(p, blk.b, h, blk.seq.q_token0 + m0) + row;
      st_shared_f32(sm.row_stage(sm.lse, s) + 4 * row, in_seq ? ld_global_f32(p.lse_log2 + l_off) : INFINITY);
      st_shared_f32(sm.row_stage(sm.delta, s) + 4 * row, in_seq ? ld_global_f32(p.delta + l_off) : 0.f);
      if (row != 0) {
        mbarrier_arrive(sm.full + 8 * s);
        continue;
      }
      const int token = blk.seq.q_token0 + m0;
      mbarrier_arrive_expect_tx(sm.full + 8 * s, 2 * Cfg::kBoxBytesQ);
#pragma unroll
      for (int panel = 0; panel < kPanels; ++panel) {
        const uint32_t off = panel * Cfg::QTile::kPanelBytes;
        tma_load_4d(sm.stage(sm.q, s) + off, hp.tma_q, sm.full + 8 * s, 64 * panel, token, h, bc);
        tma_load_4d(sm.stage(sm.d_o, s) + off, hp.tma_do, sm.full + 8 * s, 64 * panel, token, h, bc);
      }
    }
  }
}

// The producer: every work tile of this block, those no query sees skipped (the consumers write zeros).
template <class Cfg>
__device__ __forceinline__ void produce_bwd(const HopperBwdParams& hp, const HopperBwdSmem<Cfg>& sm) {
  using Work = BwdWorkTiles<Cfg::kBlockN, true>;
  setmaxnreg_dec<Cfg::kProducerRegs>();
  const int row = static_cast<int>(threadIdx.x);
  if (row >= Cfg::kBlockM) return;
  const BwdParams& p = hp.p;
  int it = 0, kv_round = 0;
#pragma unroll 1
  for (int w = blockIdx.x; w < Work::total(p); w += hp.ctas) {
    int n_block, hk, b;
    Work::coords(w, p, n_block, hk, b);
    const HopperBwdBlock<Cfg::kBlockM, Cfg::kBlockN> blk(p, n_block, hk, b);
    if (blk.t_first < blk.t_hi) produce_bwd_tile<Cfg>(hp, sm, blk, row, it, kv_round++);
  }
}

// Element (query row r of the tile, column c) of one consumer's dQ share over exactly the keys query m
// sees among its 64 (n0w.. in the sequence, rows krow0.. of the K tile), from dS^T and K in shared memory.
template <class Cfg>
__device__ __forceinline__ float seen_dq_share(const AttnParams& p, const SeqSlice& seq, const uint32_t* key_bits,
                                               uint32_t s_ds, uint32_t s_k, int n0w, int krow0, int m, int r, int c) {
  using Elem = typename Cfg::Elem;
  float acc = 0.f;
#pragma unroll 1
  for (int kk = 0; kk < 64; ++kk) {
    if (!is_token(key_bits, n0w + kk, seq.len_k) || !in_window(p, seq, m, n0w + kk)) continue;
    acc += ld_shared_elem<typename Cfg::DSTile, Elem>(s_ds, kk, r) *
           ld_shared_elem<typename Cfg::KVTile, Elem>(s_k, krow0 + kk, c);
  }
  return acc;
}

// dK and dV of this consumer's 64 keys when no query sees them: zeros.
template <class Cfg>
__device__ __forceinline__ void write_zero_dkdv(const BwdParams& p,
                                                const HopperBwdBlock<Cfg::kBlockM, Cfg::kBlockN>& blk) {
  constexpr int kChunks = Cfg::kHeadDim / 8;
  const int key_token = blk.seq.k_token0 + blk.n0;
  uint16_t* dk = static_cast<uint16_t*>(p.dk) +
                 token_offset(p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, blk.b, key_token, blk.hk);
  uint16_t* dv = static_cast<uint16_t*>(p.dv) +
                 token_offset(p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, blk.b, key_token, blk.hk);
  const BwdConsumerThread me;
  const int r0 = me.krow0(), rows = min(64, blk.cols - r0);
  for (int idx = me.thread(); idx < rows * kChunks; idx += 128) {
    const int64_t off = (r0 + idx / kChunks) * p.dk_row_stride + (idx % kChunks) * 8;
    st_global_16(dk + off, make_uint4(0u, 0u, 0u, 0u));
    st_global_16(dv + off, make_uint4(0u, 0u, 0u, 0u));
  }
}

// One consumer warpgroup on one work tile that some query sees: its 64 keys against every query tile of the
// walk (adding dQ shares if kAtomicDq), then dK and dV, staged through its K and V rows, which then go back to
// the producer (kv_empty). `it` counts the ring's tiles across work tiles, kv_round the K/V tiles. Every value
// derived from the thread index comes from a BwdConsumerThread built where it is used, and t_hi, the tile's key
// count and its first key token are recomputed where needed: kept live across the query-tile loop, they spilled.
template <class Cfg, bool kAtomicDq>
__device__ __forceinline__ void consume_bwd_tile(const HopperBwdParams& hp,
                                                 const HopperBwdBlock<Cfg::kBlockM, Cfg::kBlockN>& blk,
                                                 const HopperBwdSmem<Cfg>& sm, int& it, int kv_round) {
  using Elem = typename Cfg::Elem;
  using QTile = typename Cfg::QTile;
  using KVTile = typename Cfg::KVTile;
  using DSTile = typename Cfg::DSTile;
  constexpr int D = Cfg::kHeadDim, BM = Cfg::kBlockM, kStages = Cfg::kStages;
  constexpr int kQT = BM / 8, kDT = D / 8;  // n8 column tiles of S^T and of dK / dV / dQ
  const BwdParams& p = hp.p;
  const SeqSlice& seq = blk.seq;
  TileBits<Cfg::kBlockN> key_valid;
  key_valid.load(blk.key_bits, blk.n0, seq.len_k);
  const bool keys_all_valid = key_valid.all();
  bool key_ok[2];
  {
    const BwdConsumerThread me;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      key_ok[hf] = is_token(blk.key_bits, blk.n0 + me.warp_key0() + me.lane / 4 + 8 * hf, seq.len_k);
    }
  }

  const ScoreTransform score(p);
  float acc_dk[D / 2], acc_dv[D / 2];  // n8 tile dt: [4 dt .. 4 dt + 3], rows = keys
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc_dk[i] = acc_dv[i] = 0.f;

  // S^T, dP^T of a query tile: n8 tile j = queries 8 j ..; then P^T, dS^T. Declared outside the loop: the CPU
  // emulator compiles the kernel as host C++, where a loop-local array's memory may hold another value between
  // iterations, which its wgmma register check would report as a write after wgmma_fence.
  float acc_s[BM / 2], acc_dp[BM / 2];
  mbarrier_wait(sm.kv_full, kv_round & 1);
#pragma unroll 1
  for (int tile = blk.t_first, end = blk.t_hi; tile < end; tile = blk.fresh_after(p, tile, end)) {
#pragma unroll 1
    for (int c = 0; c < p.group; ++c, ++it) {
      const int h = blk.hk * p.group + c;
      const BwdConsumerThread me;
      const int n0w = blk.n0 + me.krow0();
      const uint32_t s_ds = sm.ds + me.consumer * DSTile::kBytes;
      const uint32_t* query_bits = blk.query_bits(p);
      const int s = it % kStages;
      const uint32_t sq = sm.stage(sm.q, s), sdo = sm.stage(sm.d_o, s);
      // K's and V's wgmma descriptors are recomputed per query tile: the persistent schedule's loop state leaves
      // no room to keep their 16 words in registers across the loop.
      const uint32_t k_tile = opaque(sm.k), v_tile = opaque(sm.v);
      const int m0 = tile * BM;
      mbarrier_wait(sm.full + 8 * s, (it / kStages) & 1);
      wgmma_fence_operands(acc_s);
      wgmma_fence_operands(acc_dp);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wgmma_ss<Elem, BM, Major::kK, Major::kK>(acc_s, KVTile::k_major(k_tile, me.krow0(), kk),
                                                 QTile::k_major(sq, 0, kk), kk > 0);
      }
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wgmma_ss<Elem, BM, Major::kK, Major::kK>(acc_dp, KVTile::k_major(v_tile, me.krow0(), kk),
                                                 QTile::k_major(sdo, 0, kk), kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operands(acc_s);
      wgmma_fence_operands(acc_dp);

      // P^T = 2^(x - lse2) and dS^T = P^T (dP^T - delta) (1 - t^2); pairs of padding or out-of-sequence keys
      // or queries and pairs outside the window are selected to 0 (never computed from a -inf score).
      TileBits<BM> query_valid;
      query_valid.load(query_bits, m0, seq.len_q);
      const bool tile_masked =
          !keys_all_valid || !query_valid.all() || !window_covers_tile(p, seq, m0, BM, blk.n0, Cfg::kBlockN);
#pragma unroll
      for (int j = 0; j < kQT; ++j) {
        const float2 lse2s = ld_shared_f32x2(sm.row_stage(sm.lse, s) + 4 * (8 * j + 2 * (me.lane % 4)));
        const float2 deltas = ld_shared_f32x2(sm.row_stage(sm.delta, s) + 4 * (8 * j + 2 * (me.lane % 4)));
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int bit = (j % 4) * 8 + 2 * (me.lane % 4) + (e % 2);  // query m0 + 32 * (j / 4) + bit
          const int col = 32 * (j / 4) + bit;
          const float lse2 = e % 2 == 0 ? lse2s.x : lse2s.y;
          const float delta = e % 2 == 0 ? deltas.x : deltas.y;
          bool seen = true;
          if (tile_masked) {
            const int key = blk.n0 + me.warp_key0() + me.lane / 4 + 8 * (e / 2);
            seen = key_ok[e / 2] && query_valid.test(j / 4, bit) && in_window(p, seq, m0 + col, key);
          }
          const float t = score.stored(acc_s[4 * j + e]);
          const float prob = fast_exp2(score.log2_units(t) - lse2);
          acc_dp[4 * j + e] = seen ? prob * (acc_dp[4 * j + e] - delta) * score.derivative(t) : 0.f;
          acc_s[4 * j + e] = seen ? prob : 0.f;
        }
      }
      uint32_t a_p[BM / 16][4], a_ds[BM / 16][4];  // P^T and dS^T as A operands, 16 queries per k step
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        accumulator_cols_to_a<Elem>(a_p[kk], acc_s, kk);
        accumulator_cols_to_a<Elem>(a_ds[kk], acc_dp, kk);
      }
      if constexpr (kAtomicDq) {
        // dS^T to this warpgroup's shared tile, once its previous dQ product has retired in every warp.
        // (The tile's address is opaque so that its 16 store addresses are recomputed here, not hoisted out of
        // the loop, where they would stay live and spill.)
        named_barrier_sync(kBwdConsumerBarrier0 + me.consumer, 128);
        const uint32_t ds_tile = opaque(s_ds);
#pragma unroll
        for (int j = 0; j < kQT; ++j) {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            store_pair<DSTile, Elem>(ds_tile, 16 * me.warp + me.lane / 4 + 8 * hf, j, acc_dp[4 * j + 2 * hf],
                                     acc_dp[4 * j + 2 * hf + 1]);
          }
        }
        fence_proxy_async();
        named_barrier_sync(kBwdConsumerBarrier0 + me.consumer, 128);
      }

      // dV += P^T dO, dK += dS^T Q (k = the tile's queries); then dQ_share = dS K_own (k = this warpgroup's
      // keys), once P^T and dS^T have left the registers (both groups in flight at once would spill).
      wgmma_fence_operands(acc_dk);
      wgmma_fence_operands(acc_dv);
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        wgmma_fence_operands(a_p[kk]);
        wgmma_fence_operands(a_ds[kk]);
      }
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BM / 16; ++kk) {
        wgmma_rs<Elem, D, Major::kMN>(acc_dv, a_p[kk], QTile::mn_major(sdo, kk), true);
        wgmma_rs<Elem, D, Major::kMN>(acc_dk, a_ds[kk], QTile::mn_major(sq, kk), true);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operands(acc_dk);
      wgmma_fence_operands(acc_dv);
      mbarrier_arrive(sm.empty + 8 * s);  // Q and dO of this stage are no longer read
      if constexpr (!kAtomicDq) continue;  // the deterministic path's dQ is bwd_dq_sm90.cuh's
      float acc_dq[D / 2];  // rows = the tile's queries
      wgmma_fence_operands(acc_dq);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        wgmma_ss<Elem, D, Major::kMN, Major::kMN>(acc_dq, DSTile::mn_major(s_ds, kk),
                                                  KVTile::mn_major(k_tile, 4 * me.consumer + kk), kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operands(acc_dq);

      // Each thread adds to two query rows (r0 and r0 + 8), every address an offset of its first element's
      // (computed per element from the row index, they took 17% more instructions per query tile at d128).
      const int r0 = 16 * me.warp + me.lane / 4;
      const bool row_real[2] = {is_token(query_bits, m0 + r0, seq.len_q), is_token(query_bits, m0 + r0 + 8, seq.len_q)};
      float* dq_thread = p.dq_accum + 2 * (me.lane % 4) +
                         token_offset(p.dqa_batch_stride, p.dqa_row_stride, p.dqa_head_stride, blk.b,
                                      seq.q_token0 + m0 + r0, h);
      // A non-finite element may hold 0 * NaN from a key its query does not see: bit 4 dt + e of `redo`,
      // recomputed exactly from the shared tiles below.
      static_assert(D / 2 <= 64, "one bit per dQ accumulator element");
      uint64_t redo = 0;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (!row_real[e / 2]) continue;
          if (nonfinite(acc_dq[4 * dt + e])) {
            redo |= uint64_t{1} << (4 * dt + e);
          } else {
            atomic_add_f32(dq_thread + (e / 2) * 8 * p.dqa_row_stride + 8 * dt + e % 2, acc_dq[4 * dt + e]);
          }
        }
      }
#pragma unroll 1
      for (int idx = 0; redo != 0 && idx < D / 2; ++idx) {
        if (!((redo >> idx) & 1u)) continue;
        const int r = r0 + 8 * ((idx % 4) / 2);
        const int col = 8 * (idx / 4) + 2 * (me.lane % 4) + (idx % 2);
        atomic_add_f32(dq_thread + ((idx % 4) / 2) * 8 * p.dqa_row_stride + 8 * (idx / 4) + idx % 2,
                       seen_dq_share<Cfg>(p, seq, blk.key_bits, s_ds, sm.k, n0w, me.krow0(), m0 + r, r, col));
      }
    }
  }

  // dK and dV staged through this warpgroup's own K and V rows, once every warp's products have retired.
  const BwdConsumerThread me;
  named_barrier_sync(kBwdConsumerBarrier0 + me.consumer, 128);
  // The epilogue's shared addresses derive from opaque values (the tiles, the thread) so that they are recomputed
  // per work tile: hoisted out of the persistent loop, they would stay live across it and spill. So is the sequence
  // (b opaque: its first key token and the tile's key count are read again, not kept across the loop).
  const uint32_t dk_tile = opaque(sm.k), dv_tile = opaque(sm.v);
  const int stage_row0 = me.warp_key0();
  const SeqSlice tile_seq = seq_slice(p, static_cast<int>(opaque(blk.b)));
  const int key_token = tile_seq.k_token0 + blk.n0, cols = min(Cfg::kBlockN, tile_seq.len_k - blk.n0);
  const uint16_t* k = static_cast<const uint16_t*>(p.k) +
                      token_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, blk.b, key_token, blk.hk);
  const uint16_t* v = static_cast<const uint16_t*>(p.v) +
                      token_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, blk.b, key_token, blk.hk);
  uint16_t* dk = static_cast<uint16_t*>(p.dk) +
                 token_offset(p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, blk.b, key_token, blk.hk);
  uint16_t* dv = static_cast<uint16_t*>(p.dv) +
                 token_offset(p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, blk.b, key_token, blk.hk);
  bool redo[2] = {false, false};  // a non-finite gradient, maybe from 0 * NaN (padding keys included)
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = stage_row0 + me.lane / 4 + 8 * hf;
      const float k0 = acc_dk[4 * dt + 2 * hf], k1 = acc_dk[4 * dt + 2 * hf + 1];
      const float v0 = acc_dv[4 * dt + 2 * hf], v1 = acc_dv[4 * dt + 2 * hf + 1];
      redo[hf] = redo[hf] || nonfinite(k0) || nonfinite(k1) || nonfinite(v0) || nonfinite(v1);
      store_pair<KVTile, Elem>(dk_tile, r, dt, nan_if_infinite(k0 * p.scale), nan_if_infinite(k1 * p.scale));
      store_pair<KVTile, Elem>(dv_tile, r, dt, nan_if_infinite(v0), nan_if_infinite(v1));
    }
  }
  const uint32_t redo_rows = flagged_rows(redo[0], redo[1]);
  __syncwarp();
  if (redo_rows != 0) {  // the exact slow path, over the rows' staged gradients
#pragma unroll 1
    for (int wr = 0; wr < 16; ++wr) {
      if (!((redo_rows >> wr) & 1u)) continue;
      const int r = stage_row0 + wr;
      RowSlice<D> dk_row, dv_row;
      seen_dkdv_row<Elem, D>(p, tile_seq, score, blk.b, blk.hk, blk.n0 + r, k + r * p.k_row_stride,
                             v + r * p.v_row_stride, blk.key_bits, blk.query_bits(p), dk_row, dv_row);
      store_row_slice<KVTile, Elem, D>(dk_tile, r, dk_row, p.scale);
      store_row_slice<KVTile, Elem, D>(dv_tile, r, dv_row, 1.f);
    }
    __syncwarp();
  }
  copy_rows_to_global<KVTile, 16>(dk_tile, stage_row0, dk, p.dk_row_stride, cols);
  copy_rows_to_global<KVTile, 16>(dv_tile, stage_row0, dv, p.dk_row_stride, cols);
  // The K and V tiles (which staged dK and dV) go back to the producer; its next TMA load overwrites them.
  fence_proxy_async();
  mbarrier_arrive(sm.kv_empty);
}

// A consumer warpgroup: every work tile of this block. While a work tile's query-tile loop runs, the loop's own
// state (work tile, kv_round) waits in this thread's slot of shared memory: kept in registers across that loop,
// it (or what ptxas evicted in its place) spilled on the atomic path.
template <class Cfg, bool kAtomicDq>
__device__ __forceinline__ void consume_bwd(const HopperBwdParams& hp, const HopperBwdSmem<Cfg>& sm) {
  using Work = BwdWorkTiles<Cfg::kBlockN, true>;
  setmaxnreg_inc<Cfg::kConsumerRegs>();
  const BwdParams& p = hp.p;
  int it = 0, kv_round = 0;
#pragma unroll 1
  for (int w = blockIdx.x; w < Work::total(p); w += hp.ctas) {
    int n_block, hk, b;
    Work::coords(w, p, n_block, hk, b);
    const HopperBwdBlock<Cfg::kBlockM, Cfg::kBlockN> blk(p, n_block, hk, b);
    if (blk.cols <= 0) continue;  // past the end of a shorter varlen sequence
    if (blk.t_first >= blk.t_hi) {
      write_zero_dkdv<Cfg>(p, blk);
      continue;
    }
    st_shared_u32(sm.loop_state_slot(), static_cast<uint32_t>(w));
    st_shared_u32(sm.loop_state_slot() + 4, static_cast<uint32_t>(kv_round + 1));
    consume_bwd_tile<Cfg, kAtomicDq>(hp, blk, sm, it, kv_round);
    const float2 saved = ld_shared_f32x2(sm.loop_state_slot());  // the two words' bits (no 8-byte integer load)
    memcpy(&w, &saved.x, 4);
    memcpy(&kv_round, &saved.y, 4);
  }
}

// A persistent grid of hp.ctas blocks over the work tiles (key tile, kv head, sequence); kAtomicDq: dQ added to
// p.dq_accum too.
template <class Cfg, bool kAtomicDq>
__global__ void __launch_bounds__(Cfg::kThreads, 1) bwd_sm90_kernel(const __grid_constant__ HopperBwdParams hp) {
  const HopperBwdSmem<Cfg> sm(dynamic_smem());
  if (threadIdx.x == 0) {
    mbarrier_init(sm.kv_full, 1);
    mbarrier_init(sm.kv_empty, 128 * Cfg::kConsumers);
    for (int s = 0; s < Cfg::kStages; ++s) {
      mbarrier_init(sm.full + 8 * s, Cfg::kBlockM);  // the lse2/delta copiers, thread 0 also expecting the TMA bytes
      mbarrier_init(sm.empty + 8 * s, 128 * Cfg::kConsumers);
    }
    mbarrier_init_fence();
  }
  __syncthreads();
  if (threadIdx.x < 128) {
    produce_bwd<Cfg>(hp, sm);
  } else {
    consume_bwd<Cfg, kAtomicDq>(hp, sm);
  }
}

}  // namespace l2vf
