// The attention backward: a preprocess kernel, a dK/dV kernel (optionally adding dQ with float
// atomics), and a dQ kernel for the deterministic path.
//
// With P = softmax probabilities recomputed from the saved lse and dS = P * (dP - delta),
// dP = dO V^T, delta = rowsum(dO * O) - dlse:
//   dV = P^T dO,  dK = scale * dS^T Q,  dQ = scale * dS K   (times 1 - tanh^2 under a soft cap).
#pragma once

#include <cstdint>

#include "block_info.cuh"
#include "fwd_kernel.cuh"
#include "params.h"
#include "ptx.cuh"
#include "tile.cuh"

namespace l2vf {

// ---- preprocess: delta and lse in log2 units ------------------------------------------------------

// One (token, head) row per group of kHeadDim / 8 lanes, each lane one 16-byte chunk of dO and O.
template <class Elem, int kHeadDim>
struct PreprocessConfig {
  static constexpr int kThreads = 256;
  static constexpr int kLanesPerRow = kHeadDim / 8;
  static constexpr int kRowsPerBlock = kThreads / kLanesPerRow;
  static_assert(kLanesPerRow <= 32 && 32 % kLanesPerRow == 0, "a row's lanes sit inside one warp");
};

template <class Elem, int kHeadDim>
__global__ void __launch_bounds__(256) bwd_preprocess_kernel(const BwdParams p) {
  using Cfg = PreprocessConfig<Elem, kHeadDim>;
  const int64_t rows_total = p.tokens_q * p.heads_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * Cfg::kRowsPerBlock + threadIdx.x / Cfg::kLanesPerRow;
  const int chunk = static_cast<int>(threadIdx.x) % Cfg::kLanesPerRow;
  const bool active = row < rows_total;
  // row = token * heads_q + h, token = b * seqlen_q + i (padded) or the packed index (varlen).
  const int64_t token = active ? row / p.heads_q : 0;
  const int h = static_cast<int>(active ? row % p.heads_q : 0);
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int b = varlen ? 0 : static_cast<int>(token / p.seqlen_q);
  const int i = static_cast<int>(varlen ? token : token % p.seqlen_q);

  float dot = 0.f;
  if (active) {
    const uint16_t* o = static_cast<const uint16_t*>(p.out) +
                        token_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, i, h) + chunk * 8;
    const uint16_t* d_o = static_cast<const uint16_t*>(p.dout) +
                          token_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, i, h) + chunk * 8;
    const uint4 ov = ld_global_16(o), dv = ld_global_16(d_o);
    const uint32_t ow[4] = {ov.x, ov.y, ov.z, ov.w}, dw[4] = {dv.x, dv.y, dv.z, dv.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const float2 a = unpack_pair<Elem>(ow[w]), c = unpack_pair<Elem>(dw[w]);
      dot += a.x * c.x + a.y * c.y;
    }
  }
#pragma unroll
  for (int m = Cfg::kLanesPerRow / 2; m > 0; m /= 2) dot += warp_shfl_xor(dot, m);
  if (active && chunk == 0) {
    const int64_t idx = lse_offset(p, b, h, i);
    const float lse = ld_global_f32(p.lse + idx);
    st_global_f32(p.delta + idx, dot - (p.dlse != nullptr ? ld_global_f32(p.dlse + idx) : 0.f));
    st_global_f32(p.lse_log2 + idx, lse == -INFINITY ? INFINITY : lse * kLog2e);
  }
}

// ---- the exact slow path (see fwd_kernel.cuh) ------------------------------------------------------

// P and dS of one pair a query sees, from the rows as slices, in IEEE arithmetic.
struct PairGrads {
  float prob, ds;
};
template <int kHeadDim>
__device__ __forceinline__ PairGrads seen_pair_grads(const ScoreTransform& score, const RowSlice<kHeadDim>& qv,
                                                     const RowSlice<kHeadDim>& kv, const RowSlice<kHeadDim>& dov,
                                                     const RowSlice<kHeadDim>& vv, float lse2, float delta) {
  const float t = score.stored(warp_dot<kHeadDim>(qv, kv));
  const float prob = fast_exp2(score.log2_units(t) - lse2);
  return {prob, prob * (warp_dot<kHeadDim>(dov, vv) - delta) * score.derivative(t)};
}

// Unscaled dQ row i (q, dO rows given; lse2 in log2 units) over exactly the keys it sees: sum_j dS_ij k_j.
template <class Elem, int kHeadDim>
__device__ __forceinline__ void seen_dq_row(const AttnParams& p, const SeqSlice& seq, const ScoreTransform& score,
                                            int i, const uint16_t* q_row, const uint16_t* do_row, const uint16_t* k,
                                            const uint16_t* v, const uint32_t* key_bits, float lse2, float delta,
                                            RowSlice<kHeadDim>& dq) {
  RowSlice<kHeadDim> qv, dov;
  load_row_slice<Elem, kHeadDim>(q_row, qv);
  load_row_slice<Elem, kHeadDim>(do_row, dov);
#pragma unroll
  for (int e = 0; e < kHeadDim / 32; ++e) dq[e] = 0.f;
  int lo, hi;
  visible_keys(p, seq, i, 1, lo, hi);
#pragma unroll 1
  for (int j = lo; j < hi; ++j) {
    if (!is_token(key_bits, j, seq.len_k)) continue;
    RowSlice<kHeadDim> kv, vv;
    load_row_slice<Elem, kHeadDim>(k + j * p.k_row_stride, kv);
    load_row_slice<Elem, kHeadDim>(v + j * p.v_row_stride, vv);
    const float ds = seen_pair_grads<kHeadDim>(score, qv, kv, dov, vv, lse2, delta).ds;
#pragma unroll
    for (int e = 0; e < kHeadDim / 32; ++e) dq[e] += ds * kv[e];
  }
}

// Unscaled dK and dV of key j (its k, v rows given) over exactly the queries of every head of kv head
// hk's group that see it: sum_i dS_ij q_i and sum_i P_ij dO_i; zeros for a key that is no real token.
template <class Elem, int kHeadDim>
__device__ __forceinline__ void seen_dkdv_row(const BwdParams& p, const SeqSlice& seq, const ScoreTransform& score,
                                              int b, int hk, int j, const uint16_t* k_row, const uint16_t* v_row,
                                              const uint32_t* key_bits, const uint32_t* query_bits,
                                              RowSlice<kHeadDim>& dk, RowSlice<kHeadDim>& dv) {
#pragma unroll
  for (int e = 0; e < kHeadDim / 32; ++e) dk[e] = dv[e] = 0.f;
  if (!is_token(key_bits, j, seq.len_k)) return;
  RowSlice<kHeadDim> kv, vv;
  load_row_slice<Elem, kHeadDim>(k_row, kv);
  load_row_slice<Elem, kHeadDim>(v_row, vv);
  int lo, hi;
  visible_queries(p, seq, j, 1, lo, hi);
#pragma unroll 1
  for (int c = 0; c < p.group; ++c) {
    const int h = hk * p.group + c;
#pragma unroll 1
    for (int i = lo; i < hi; ++i) {
      if (!is_token(query_bits, i, seq.len_q)) continue;
      RowSlice<kHeadDim> qv, dov;
      load_row_slice<Elem, kHeadDim>(static_cast<const uint16_t*>(p.q) + token_offset(p.q_batch_stride, p.q_row_stride,
                                                                                      p.q_head_stride, b,
                                                                                      seq.q_token0 + i, h), qv);
      load_row_slice<Elem, kHeadDim>(static_cast<const uint16_t*>(p.dout) +
                                         token_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, b,
                                                      seq.q_token0 + i, h), dov);
      const int64_t l_off = lse_offset(p, b, h, seq.q_token0 + i);
      const PairGrads g = seen_pair_grads<kHeadDim>(score, qv, kv, dov, vv, ld_global_f32(p.lse_log2 + l_off),
                                                    ld_global_f32(p.delta + l_off));
#pragma unroll
      for (int e = 0; e < kHeadDim / 32; ++e) {
        dk[e] += g.ds * qv[e];
        dv[e] += g.prob * dov[e];
      }
    }
  }
}

// Element (row r, column c) of the tile product dQ_tile = dS K over exactly the keys query m = m0 + r
// sees (dS^T and K as the mma read them from shared memory), one key at a time.
template <class Cfg>
__device__ __forceinline__ float seen_dq_element(const AttnParams& p, const SeqSlice& seq, const uint32_t* key_bits,
                                                 uint32_t sdS, uint32_t sK, int m, int n0, int r, int c) {
  using Elem = typename Cfg::Elem;
  float acc = 0.f;
#pragma unroll 1
  for (int kk = 0; kk < Cfg::kBlockN; ++kk) {
    if (!is_token(key_bits, n0 + kk, seq.len_k) || !in_window(p, seq, m, n0 + kk)) continue;
    const float ds = ld_shared_elem<typename Cfg::DSTile, Elem>(sdS, kk, r);
    acc += ds * ld_shared_elem<typename Cfg::KVTile, Elem>(sK, kk, c);
  }
  return acc;
}

// ---- dK / dV (+ atomic dQ) ---------------------------------------------------------------------

// One block per (key tile, kv head, sequence); each warp owns 16 keys. The block walks the query
// tiles of every query head of its group (GQA: dK and dV are reduced over the group in registers).
// Per query tile, with this warp's keys as rows:
//   S^T = K Q^T, dP^T = V dO^T (A = own K/V rows, B = Q/dO rows: [n][k] layout),
//   P^T, dS^T in registers, dV += P^T dO, dK += dS^T Q (A from registers, B = dO/Q via .trans);
//   fast path: dS^T to shared memory, then dQ_tile = dS K (A = dS^T via .trans, B = K via .trans)
//   added to a float32 buffer with atomics.
template <class Elem_, int kHeadDim_, int kBlockM_, int kWarps_, int kStages_>
struct BwdKVConfig {
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kWarps = kWarps_, kStages = kStages_;
  static constexpr int kBlockN = 16 * kWarps;
  static constexpr int kThreads = kWarps * 32;
  using KVTile = SmemTile<kBlockN, kHeadDim>;
  using QTile = SmemTile<kBlockM, kHeadDim>;
  using DSTile = SmemTile<kBlockN, kBlockM>;  // dS^T: [key][query]
  // dQ_tile = dS K split over warps: kDqWarpsM warps along queries (16 rows each) x kDqWarpsN along the head dim.
  static constexpr int kDqWarpsM = kBlockM / 16;
  static constexpr int kDqWarpsN = kWarps / kDqWarpsM;
  static constexpr int kDqCols = kHeadDim / kDqWarpsN;
  static constexpr int kSmemBytes =
      2 * KVTile::kBytes + 2 * kStages * QTile::kBytes + 2 * kStages * kBlockM * 4 + DSTile::kBytes;

  static_assert(kBlockM == 32 || kBlockM % 64 == 0, "dS^T rows: 4 chunks or whole 128-byte rows");
  static_assert(kBlockN % 32 == 0 && 128 % kBlockN == 0, "key tiles cover whole words of the mask bits");
  static_assert(128 % kBlockM == 0, "query tiles cover whole words of the mask bits");
  static_assert(kWarps % kDqWarpsM == 0 && kHeadDim % kDqWarpsN == 0 && kDqCols % 16 == 0, "dQ warp split");
  static_assert(kBlockM <= kThreads, "one thread per row loads lse and delta");
  static_assert(kStages >= 2, "the ring needs at least double buffering");
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) bwd_dkdv_kernel(const BwdParams p) {
  using Elem = typename Cfg::Elem;
  using KVTile = typename Cfg::KVTile;
  using QTile = typename Cfg::QTile;
  using DSTile = typename Cfg::DSTile;
  constexpr int D = Cfg::kHeadDim, BM = Cfg::kBlockM, BN = Cfg::kBlockN;
  constexpr int kQT = BM / 8, kDT = D / 8, kThreads = Cfg::kThreads, kStages = Cfg::kStages;

  const int n_block = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const SeqSlice seq = seq_slice(p, b);
  const int n0 = n_block * BN;
  if (n0 >= seq.len_k) return;
  const int cols = min(BN, seq.len_k - n0);  // keys of this tile inside the sequence
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;

  const uint16_t* k = static_cast<const uint16_t*>(p.k) +
                      token_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, seq.k_token0 + n0, hk);
  const uint16_t* v = static_cast<const uint16_t*>(p.v) +
                      token_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, seq.k_token0 + n0, hk);
  uint16_t* dk = static_cast<uint16_t*>(p.dk) +
                 token_offset(p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, b, seq.k_token0 + n0, hk);
  uint16_t* dv = static_cast<uint16_t*>(p.dv) +
                 token_offset(p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, b, seq.k_token0 + n0, hk);
  const uint32_t* key_bits = p.key_bits != nullptr ? p.key_bits + static_cast<int64_t>(b) * p.key_bits_stride : nullptr;
  const uint32_t* query_bits = p.query_rows_masked ? key_bits : nullptr;

  // The query tiles [t_first, t_hi) that can see this key tile, walked for each head of the group.
  int m_lo, m_hi, t_first, t_hi;
  visible_queries(p, seq, n0, cols, m_lo, m_hi);
  tile_walk<BN, BM>(m_lo, m_hi, key_bits, n0, query_bits, t_first, t_hi);
  if (t_first >= t_hi) {  // no query sees these keys: zero gradients
    zero_rows_global<D, kThreads>(dk, p.dk_row_stride, cols);
    zero_rows_global<D, kThreads>(dv, p.dk_row_stride, cols);
    return;
  }

  const uint32_t sK = dynamic_smem();
  const uint32_t sV = sK + KVTile::kBytes;
  const uint32_t sQ = sV + KVTile::kBytes;  // kStages tiles
  const uint32_t sdO = sQ + kStages * QTile::kBytes;
  const uint32_t sLse = sdO + kStages * QTile::kBytes;  // kStages x BM floats, log2 units
  const uint32_t sDelta = sLse + kStages * BM * 4;
  const uint32_t sdS = sDelta + kStages * BM * 4;

  // The walk over (head of the group, query tile), skipping tiles of padded queries.
  struct Cursor {
    int head, tile;
  };
  auto advance = [&](Cursor c) {
    c.tile = next_tile_with_tokens<BM>(query_bits, c.tile + 1, t_hi);
    if (c.tile >= t_hi) {
      ++c.head;
      c.tile = t_first;
    }
    return c;
  };
  auto load_q_tile = [&](Cursor c, int stage) {
    const int h = hk * p.group + c.head;
    const int m0 = c.tile * BM;
    const int64_t q_off = token_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, seq.q_token0 + m0, h);
    const int64_t do_off = token_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, seq.q_token0 + m0, h);
    const int64_t l_off = lse_offset(p, b, h, seq.q_token0 + m0);
    copy_real_rows_async<QTile, kThreads>(sQ + stage * QTile::kBytes, static_cast<const uint16_t*>(p.q) + q_off,
                                          p.q_row_stride, seq.len_q - m0, query_bits, m0);
    copy_real_rows_async<QTile, kThreads>(sdO + stage * QTile::kBytes, static_cast<const uint16_t*>(p.dout) + do_off,
                                          p.do_row_stride, seq.len_q - m0, query_bits, m0);
    copy_floats_async<BM>(sLse + stage * BM * 4, p.lse_log2 + l_off, seq.len_q - m0);
    copy_floats_async<BM>(sDelta + stage * BM * 4, p.delta + l_off, seq.len_q - m0);
  };

  // Group 0 = K, V and the first query tile; groups 1 .. kStages-2 = the next query tiles.
  copy_real_rows_async<KVTile, kThreads>(sK, k, p.k_row_stride, cols, key_bits, n0);
  copy_real_rows_async<KVTile, kThreads>(sV, v, p.v_row_stride, cols, key_bits, n0);
  Cursor load = {0, t_first};
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (load.head < p.group) {
      load_q_tile(load, s);
      load = advance(load);
    }
    cp_async_commit();
  }

  // This thread's two keys (rows g and g + 8 of the warp's 16): real tokens inside the sequence?
  TileBits<BN> key_valid;
  key_valid.load(key_bits, n0, seq.len_k);
  const bool keys_all_valid = key_valid.all();
  bool key_ok[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) key_ok[hf] = is_token(key_bits, n0 + warp * 16 + lane / 4 + 8 * hf, seq.len_k);

  const LdsmAddr<KVTile> k_frag = a_operand<KVTile>(sK), v_frag = a_operand<KVTile>(sV);
  const LdsmAddr<QTile> q_frag = b_operand<QTile>(sQ), do_frag = b_operand<QTile>(sdO);
  const LdsmAddr<QTile> q_frag_t = b_operand_trans<QTile>(sQ), do_frag_t = b_operand_trans<QTile>(sdO);
  const LdsmAddr<DSTile> ds_frag = a_operand_trans<DSTile>(sdS);
  const LdsmAddr<KVTile> k_frag_t = b_operand_trans<KVTile>(sK);

  const ScoreTransform score(p);
  float acc_dk[kDT][4], acc_dv[kDT][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[dt][e] = acc_dv[dt][e] = 0.f;
  }

  Cursor cur = {0, t_first};
  for (int it = 0; cur.head < p.group; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (load.head < p.group) {
      load_q_tile(load, (it + kStages - 1) % kStages);
      load = advance(load);
    }
    cp_async_commit();

    const int stage = it % kStages;
    const uint32_t q_stage_bytes = stage * QTile::kBytes;
    const uint32_t sLses = sLse + stage * BM * 4;
    const uint32_t sDeltas = sDelta + stage * BM * 4;
    const int m0 = cur.tile * BM;

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys.
    float acc_s[kQT][4], acc_dp[kQT][4];
#pragma unroll
    for (int j = 0; j < kQT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[j][e] = acc_dp[j][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      load_a(a, k_frag, warp * 16, 2 * kk);
#pragma unroll
      for (int np = 0; np < kQT / 2; ++np) {
        uint32_t bq[4];
        load_b_pair(bq, q_frag.plus(q_stage_bytes), np * 16, 2 * kk);
        mma_16816<Elem>(acc_s[2 * np], a, bq[0], bq[1]);
        mma_16816<Elem>(acc_s[2 * np + 1], a, bq[2], bq[3]);
      }
    }
#pragma unroll
    for (int j = 0; j < kQT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_s[j][e] = score.stored(acc_s[j][e]);
    }
    // Pairs of keys that are padding or past the sequence, queries that are padding or past it, and pairs
    // outside the window: bit 4 j + e of `unseen`. Their P and dS are selected to 0 below (never computed
    // from a -inf score: 2^(-inf - NaN) is NaN on a NaN row).
    TileBits<BM> query_valid;
    query_valid.load(query_bits, m0, seq.len_q);
    const bool tile_masked = !keys_all_valid || !query_valid.all() || !window_covers_tile(p, seq, m0, BM, n0, BN);
    uint32_t unseen = 0;
    static_assert(4 * kQT <= 32, "one bit per accumulator element of the tile");
    if (tile_masked) {
#pragma unroll
      for (int j = 0; j < kQT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = n0 + warp * 16 + lane / 4 + 8 * (e / 2);
          const int bit = (j % 4) * 8 + 2 * (lane % 4) + (e % 2);  // query m0 + 32 * (j / 4) + bit
          const int query = m0 + 32 * (j / 4) + bit;
          if (!key_ok[e / 2] || !query_valid.test(j / 4, bit) || !in_window(p, seq, query, key)) {
            unseen |= 1u << (4 * j + e);
          }
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      load_a(a, v_frag, warp * 16, 2 * kk);
#pragma unroll
      for (int np = 0; np < kQT / 2; ++np) {
        uint32_t bo[4];
        load_b_pair(bo, do_frag.plus(q_stage_bytes), np * 16, 2 * kk);
        mma_16816<Elem>(acc_dp[2 * np], a, bo[0], bo[1]);
        mma_16816<Elem>(acc_dp[2 * np + 1], a, bo[2], bo[3]);
      }
    }

    // P^T = 2^(x - lse2) (0 for unseen pairs and for queries that saw nothing: lse2 = +inf),
    // dS^T = P^T (dP^T - delta) (1 - t^2).
#pragma unroll
    for (int j = 0; j < kQT; ++j) {
      const float2 lse2 = ld_shared_f32x2(sLses + 4 * (j * 8 + 2 * (lane % 4)));
      const float2 delta = ld_shared_f32x2(sDeltas + 4 * (j * 8 + 2 * (lane % 4)));
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float t = acc_s[j][e];
        const float prob = fast_exp2(score.log2_units(t) - (e % 2 == 0 ? lse2.x : lse2.y));
        const bool seen = !tile_masked || !((unseen >> (4 * j + e)) & 1u);
        acc_dp[j][e] = seen ? prob * (acc_dp[j][e] - (e % 2 == 0 ? delta.x : delta.y)) * score.derivative(t) : 0.f;
        acc_s[j][e] = seen ? prob : 0.f;
      }
    }

    if (p.dq_accum != nullptr) {  // dS^T to shared memory for the dQ product below
#pragma unroll
      for (int j = 0; j < kQT; ++j) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          store_pair<DSTile, Elem>(sdS, warp * 16 + lane / 4 + 8 * hf, j, acc_dp[j][2 * hf], acc_dp[j][2 * hf + 1]);
        }
      }
    }

    // dV += P^T dO and dK += dS^T Q (k = the tile's queries).
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t ap[4], ads[4];
      accumulators_to_a<Elem>(ap, acc_s[2 * kk], acc_s[2 * kk + 1]);
      accumulators_to_a<Elem>(ads, acc_dp[2 * kk], acc_dp[2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t bo[4], bq[4];
        load_b_pair_trans(bo, do_frag_t.plus(q_stage_bytes), kk * 16, 2 * dp);
        mma_16816<Elem>(acc_dv[2 * dp], ap, bo[0], bo[1]);
        mma_16816<Elem>(acc_dv[2 * dp + 1], ap, bo[2], bo[3]);
        load_b_pair_trans(bq, q_frag_t.plus(q_stage_bytes), kk * 16, 2 * dp);
        mma_16816<Elem>(acc_dk[2 * dp], ads, bq[0], bq[1]);
        mma_16816<Elem>(acc_dk[2 * dp + 1], ads, bq[2], bq[3]);
      }
    }

    if (p.dq_accum != nullptr) {
      __syncthreads();  // every warp's dS^T is in shared memory
      // dQ_tile = dS K by warps over (16 queries) x (kDqCols head dims).
      const int wm = warp % Cfg::kDqWarpsM, wn = warp / Cfg::kDqWarpsM;
      float acc_dq[Cfg::kDqCols / 8][4];
#pragma unroll
      for (int dt = 0; dt < Cfg::kDqCols / 8; ++dt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dq[dt][e] = 0.f;
      }
#pragma unroll
      for (int kc = 0; kc < BN / 16; ++kc) {
        uint32_t a[4];
        load_a_trans(a, ds_frag, kc * 16, 2 * wm);
#pragma unroll
        for (int dp = 0; dp < Cfg::kDqCols / 16; ++dp) {
          uint32_t bk[4];
          load_b_pair_trans(bk, k_frag_t, kc * 16, (wn * Cfg::kDqCols) / 8 + 2 * dp);
          mma_16816<Elem>(acc_dq[2 * dp], a, bk[0], bk[1]);
          mma_16816<Elem>(acc_dq[2 * dp + 1], a, bk[2], bk[3]);
        }
      }
      const int h = hk * p.group + cur.head;
      float* dq = p.dq_accum + token_offset(p.dqa_batch_stride, p.dqa_row_stride, p.dqa_head_stride, b,
                                            seq.q_token0 + m0, h);
      // A non-finite element may hold 0 * NaN from a key its query does not see: bit 4 dt + e of `redo`,
      // added by the exact slow path below (one copy of it, after the accumulators are dead).
      constexpr int kDqElems = Cfg::kDqCols / 2;
      static_assert(kDqElems <= 32, "one bit per dQ accumulator element");
      uint32_t redo = 0;
#pragma unroll
      for (int dt = 0; dt < Cfg::kDqCols / 8; ++dt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = wm * 16 + lane / 4 + 8 * (e / 2);
          const int c = wn * Cfg::kDqCols + dt * 8 + 2 * (lane % 4) + (e % 2);
          if (!is_token(query_bits, m0 + r, seq.len_q)) continue;
          if (nonfinite(acc_dq[dt][e])) {
            redo |= 1u << (4 * dt + e);
          } else {
            atomic_add_f32(dq + r * p.dqa_row_stride + c, acc_dq[dt][e]);
          }
        }
      }
#pragma unroll 1
      for (int idx = 0; redo != 0 && idx < kDqElems; ++idx) {
        if (!((redo >> idx) & 1u)) continue;
        const int r = wm * 16 + lane / 4 + 8 * ((idx % 4) / 2);
        const int c = wn * Cfg::kDqCols + (idx / 4) * 8 + 2 * (lane % 4) + (idx % 2);
        const float exact = seen_dq_element<Cfg>(p, seq, key_bits, sdS, sK, m0 + r, n0, r, c);
        atomic_add_f32(dq + r * p.dqa_row_stride + c, exact);
      }
    }
    cur = advance(cur);
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done reading sK (dQ) and sV before they hold dK and dV

  const int r0 = warp * 16;
  bool redo[2] = {false, false};  // a non-finite gradient, maybe from 0 * NaN (padding keys included)
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = r0 + lane / 4 + 8 * hf;
      redo[hf] = redo[hf] || nonfinite(acc_dk[dt][2 * hf]) || nonfinite(acc_dk[dt][2 * hf + 1]) ||
                 nonfinite(acc_dv[dt][2 * hf]) || nonfinite(acc_dv[dt][2 * hf + 1]);
      store_pair<KVTile, Elem>(sK, r, dt, nan_if_infinite(acc_dk[dt][2 * hf] * p.scale),
                               nan_if_infinite(acc_dk[dt][2 * hf + 1] * p.scale));
      store_pair<KVTile, Elem>(sV, r, dt, nan_if_infinite(acc_dv[dt][2 * hf]), nan_if_infinite(acc_dv[dt][2 * hf + 1]));
    }
  }
  const uint32_t redo_rows = flagged_rows(redo[0], redo[1]);
  __syncwarp();
  if (redo_rows != 0) {  // the exact slow path, over the rows' staged gradients
#pragma unroll 1
    for (int wr = 0; wr < 16; ++wr) {
      if (!((redo_rows >> wr) & 1u)) continue;
      const int r = r0 + wr;
      RowSlice<D> dk_row, dv_row;
      seen_dkdv_row<Elem, D>(p, seq, score, b, hk, n0 + r, k + r * p.k_row_stride, v + r * p.v_row_stride, key_bits,
                             query_bits, dk_row, dv_row);
      store_row_slice<KVTile, Elem, D>(sK, r, dk_row, p.scale);
      store_row_slice<KVTile, Elem, D>(sV, r, dv_row, 1.f);
    }
    __syncwarp();
  }
  copy_rows_to_global<KVTile, 16>(sK, r0, dk, p.dk_row_stride, cols);
  copy_rows_to_global<KVTile, 16>(sV, r0, dv, p.dk_row_stride, cols);
}

// ---- dQ (deterministic path) --------------------------------------------------------------------

// One block per (query tile, query head, sequence), laid out like the forward: each warp owns
// kWarpRows query rows; per key tile S = Q K^T, dP = dO V^T (B = K/V rows, [n][k] layout),
// dS in registers, dQ += dS K (B = K via .trans). No atomics: each dQ element has one writer.
template <class Elem_, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_, int kStages_>
struct BwdQConfig {
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static constexpr int kWarps = kWarps_, kStages = kStages_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kBlockM / kWarps;
  static constexpr int kMTiles = kWarpRows / 16;
  using QTile = SmemTile<kBlockM, kHeadDim>;
  using KVTile = SmemTile<kBlockN, kHeadDim>;
  static constexpr int kSmemBytes = 2 * QTile::kBytes + 2 * kStages * KVTile::kBytes;

  static_assert(kBlockM % (16 * kWarps) == 0, "each warp owns whole 16-row mma tiles");
  static_assert(kBlockN % 32 == 0 && 128 % kBlockN == 0, "key tiles cover whole words of the mask bits");
  static_assert(kBlockM % 32 == 0 && 128 % kBlockM == 0, "query tiles cover whole words of the mask bits");
  static_assert(kStages >= 2, "the ring needs at least double buffering");
};

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) bwd_dq_kernel(const BwdParams p) {
  using Elem = typename Cfg::Elem;
  using QTile = typename Cfg::QTile;
  using KVTile = typename Cfg::KVTile;
  constexpr int D = Cfg::kHeadDim, BM = Cfg::kBlockM, BN = Cfg::kBlockN;
  constexpr int kMT = Cfg::kMTiles, kNT = BN / 8, kDT = D / 8, kThreads = Cfg::kThreads, kStages = Cfg::kStages;

  const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqSlice seq = seq_slice(p, b);
  const int m0 = m_block * BM;
  if (m0 >= seq.len_q) return;
  const int rows = min(BM, seq.len_q - m0);
  const int hk = h / p.group;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;

  const uint16_t* q = static_cast<const uint16_t*>(p.q) +
                      token_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, seq.q_token0 + m0, h);
  const uint16_t* d_o = static_cast<const uint16_t*>(p.dout) +
                        token_offset(p.do_batch_stride, p.do_row_stride, p.do_head_stride, b, seq.q_token0 + m0, h);
  const uint16_t* k = static_cast<const uint16_t*>(p.k) +
                      token_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, seq.k_token0, hk);
  const uint16_t* v = static_cast<const uint16_t*>(p.v) +
                      token_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, seq.k_token0, hk);
  uint16_t* dq = static_cast<uint16_t*>(p.dq) +
                 token_offset(p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, b, seq.q_token0 + m0, h);
  const int64_t l_off = lse_offset(p, b, h, seq.q_token0 + m0);
  const uint32_t* key_bits = p.key_bits != nullptr ? p.key_bits + static_cast<int64_t>(b) * p.key_bits_stride : nullptr;
  const uint32_t* query_bits = p.query_rows_masked ? key_bits : nullptr;

  int n_lo, n_hi, t_first, t_hi;
  visible_keys(p, seq, m0, rows, n_lo, n_hi);
  tile_walk<BM, BN>(n_lo, n_hi, query_bits, m0, key_bits, t_first, t_hi);
  if (t_first >= t_hi) {
    zero_rows_global<D, kThreads>(dq, p.dq_row_stride, rows);
    return;
  }

  const uint32_t sQ = dynamic_smem();
  const uint32_t sdO = sQ + QTile::kBytes;
  const uint32_t sK = sdO + QTile::kBytes;  // kStages tiles
  const uint32_t sV = sK + kStages * KVTile::kBytes;
  // Group 0 = Q, dO + the first K/V tile; groups 1 .. kStages-2 = the next tiles (possibly empty).
  copy_tile_async<QTile, kThreads>(sQ, q, p.q_row_stride, rows);
  copy_tile_async<QTile, kThreads>(sdO, d_o, p.do_row_stride, rows);
  KeyTileRing<Cfg> ring{p, seq, k, v, key_bits, sK, sV, t_hi, t_first};
  ring.prime();

  // lse (log2 units) and delta of this thread's rows; rows past the sequence see nothing.
  const int warp_row0 = warp * Cfg::kWarpRows;
  float row_lse2[kMT][2], row_delta[kMT][2];
  bool row_real[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int r = warp_row0 + mt * 16 + lane / 4 + 8 * hf;
      row_lse2[mt][hf] = r < rows ? ld_global_f32(p.lse_log2 + l_off + r) : INFINITY;
      row_delta[mt][hf] = r < rows ? ld_global_f32(p.delta + l_off + r) : 0.f;
      row_real[mt][hf] = is_token(query_bits, m0 + r, seq.len_q);
    }
  }

  const LdsmAddr<QTile> q_frag = a_operand<QTile>(sQ), do_frag = a_operand<QTile>(sdO);
  const LdsmAddr<KVTile> k_frag = b_operand<KVTile>(sK), v_frag = b_operand<KVTile>(sV);
  const LdsmAddr<KVTile> k_frag_t = b_operand_trans<KVTile>(sK);

  const ScoreTransform score(p);
  float acc_dq[kMT][kDT][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dq[mt][dt][e] = 0.f;
    }
  }

  int tile = t_first;
  for (int it = 0; tile < t_hi; ++it) {
    const uint32_t kv_stage_bytes = ring.acquire(it);
    const int n0 = tile * BN;

    float acc_s[kMT][kNT][4], acc_dp[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = acc_dp[mt][nt][e] = 0.f;
      }
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t aq[kMT][4], ado[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        load_a(aq[mt], q_frag, warp_row0 + mt * 16, 2 * kk);
        load_a(ado[mt], do_frag, warp_row0 + mt * 16, 2 * kk);
      }
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bk[4], bv[4];
        load_b_pair(bk, k_frag.plus(kv_stage_bytes), np * 16, 2 * kk);
        load_b_pair(bv, v_frag.plus(kv_stage_bytes), np * 16, 2 * kk);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<Elem>(acc_s[mt][2 * np], aq[mt], bk[0], bk[1]);
          mma_16816<Elem>(acc_s[mt][2 * np + 1], aq[mt], bk[2], bk[3]);
          mma_16816<Elem>(acc_dp[mt][2 * np], ado[mt], bv[0], bv[1]);
          mma_16816<Elem>(acc_dp[mt][2 * np + 1], ado[mt], bv[2], bv[3]);
        }
      }
    }

    TileBits<BN> bits;
    bits.load(key_bits, n0, seq.len_k);
    const bool needs_mask = !bits.all() || !window_covers_tile(p, seq, m0, BM, n0, BN);
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float t = score.stored(acc_s[mt][nt][e]);
          bool seen = true;
          if (needs_mask) {
            const int i = m0 + warp_row0 + mt * 16 + lane / 4 + 8 * (e / 2);
            const int bit = (nt % 4) * 8 + 2 * (lane % 4) + (e % 2);
            const int j = n0 + 32 * (nt / 4) + bit;
            seen = bits.test(nt / 4, bit) && in_window(p, seq, i, j);
          }
          // dS of an unseen pair is selected to 0 (2^(-inf - NaN) would be NaN on a NaN row).
          const float prob = fast_exp2(score.log2_units(t) - row_lse2[mt][e / 2]);
          acc_dp[mt][nt][e] = seen ? prob * (acc_dp[mt][nt][e] - row_delta[mt][e / 2]) * score.derivative(t) : 0.f;
        }
      }
    }

    // dQ += dS K (k = this tile's keys).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) accumulators_to_a<Elem>(a[mt], acc_dp[mt][2 * kk], acc_dp[mt][2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t bk[4];
        load_b_pair_trans(bk, k_frag_t.plus(kv_stage_bytes), kk * 16, 2 * dp);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<Elem>(acc_dq[mt][2 * dp], a[mt], bk[0], bk[1]);
          mma_16816<Elem>(acc_dq[mt][2 * dp + 1], a[mt], bk[2], bk[3]);
        }
      }
    }
    tile = ring.after(tile);
  }
  cp_async_wait<0>();

  __syncwarp();  // this warp's reads of its Q rows are done before they hold dQ
  static_assert(16 * kMT <= 32, "one bit per row of the warp");
  uint32_t redo_rows = 0;  // bit r: real row warp_row0 + r holds a non-finite value, maybe from 0 * NaN
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    bool redo[2] = {false, false};
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int r = warp_row0 + mt * 16 + lane / 4 + 8 * hf;
        const bool real = row_real[mt][hf];  // a padding row sees no key: 0, whatever the keys hold
        redo[hf] = redo[hf] || nonfinite(acc_dq[mt][dt][2 * hf]) || nonfinite(acc_dq[mt][dt][2 * hf + 1]);
        store_pair<QTile, Elem>(sQ, r, dt, real ? nan_if_infinite(acc_dq[mt][dt][2 * hf] * p.scale) : 0.f,
                                real ? nan_if_infinite(acc_dq[mt][dt][2 * hf + 1] * p.scale) : 0.f);
      }
    }
    // A NaN lse (a NaN or +inf score) makes every element NaN already, as it should.
    bool flag[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) flag[hf] = redo[hf] && row_real[mt][hf] && row_lse2[mt][hf] == row_lse2[mt][hf];
    redo_rows |= flagged_rows(flag[0], flag[1]) << (16 * mt);
  }
  __syncwarp();
  if (redo_rows != 0) {  // the exact slow path, over the rows' staged dQ
#pragma unroll 1
    for (int wr = 0; wr < Cfg::kWarpRows; ++wr) {
      if (!((redo_rows >> wr) & 1u)) continue;
      const int r = warp_row0 + wr;
      RowSlice<D> dq_row;
      seen_dq_row<Elem, D>(p, seq, score, m0 + r, q + r * p.q_row_stride, d_o + r * p.do_row_stride, k, v, key_bits,
                           ld_global_f32(p.lse_log2 + l_off + r), ld_global_f32(p.delta + l_off + r), dq_row);
      store_row_slice<QTile, Elem, D>(sQ, r, dq_row, p.scale);
    }
    __syncwarp();
  }
  copy_rows_to_global<QTile, Cfg::kWarpRows>(sQ, warp_row0, dq, p.dq_row_stride, rows);
}

}  // namespace l2vf
