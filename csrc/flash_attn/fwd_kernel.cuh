// The attention forward: one block per (query tile, query head, sequence).
//
// Each warp owns kWarpRows = 16 * kMTiles query rows. Per key tile (kBlockN keys):
//   S = Q K^T (A = Q rows from shared memory, B = K rows: the [n][k] layout, plain ldmatrix),
//   scaled into log2 units (or soft-capped; a positive scale instead folds into the exponent),
//   masked only where the tile needs it, folded into the running row max / row sum (online
//   softmax, exp2), then O += P V with P kept in
//   registers (accumulator layout = A layout) and V read through ldmatrix.trans ([k][n] layout).
// K/V tiles stream through a kStages-deep cp.async ring; tiles whose keys are all padding are
// never loaded. O is normalised at the end, staged through the warp's own rows of the Q tile and
// written with 16-byte stores; lse is written in natural-log units.
#pragma once

#include <cstdint>

#include "block_info.cuh"
#include "opaque.cuh"
#include "params.h"
#include "ptx.cuh"
#include "tile.cuh"

namespace l2vf {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Non-finite results are reported as NaN on every backend (an inf elsewhere can come out as NaN).
__device__ __forceinline__ float nan_if_infinite(float x) { return fabsf(x) == INFINITY ? NAN : x; }

// Turns raw scores into log2 units in place; under a soft cap the array keeps t = tanh(s * scale
// / softcap) instead (x = softcap * log2(e) * t, needed again for the derivative 1 - t^2).
struct ScoreTransform {
  bool capped;
  float mul;       // scale * log2(e), or scale / softcap
  float cap_log2;  // softcap * log2(e)

  __device__ __forceinline__ explicit ScoreTransform(const AttnParams& p)
      : capped(p.softcap > 0.f), mul(capped ? p.scale / p.softcap : p.scale * kLog2e), cap_log2(p.softcap * kLog2e) {}
  __device__ __forceinline__ float stored(float s) const { return capped ? accurate_tanh(s * mul) : s * mul; }
  __device__ __forceinline__ float log2_units(float stored_value) const {
    return capped ? cap_log2 * stored_value : stored_value;
  }
  // d(capped score) / d(score / scale): 1 - t^2, 0 for masked entries (t = -inf).
  __device__ __forceinline__ float derivative(float stored_value) const {
    return capped ? fmaxf(1.f - stored_value * stored_value, 0.f) : 1.f;
  }
};

// ---- the exact slow path -------------------------------------------------------------------------
//
// Inside a window-edge tile (the causal diagonal included) the mma products multiply the zero weight
// of a pair a row does not see with that key's (or query's) value: 0 * NaN = NaN reaches the row.
// The hot loop stays as it is; each kernel checks its accumulators once at the end and recomputes
// only the flagged rows exactly, one pair at a time over the pairs they see, straight from global
// memory (rare: only non-finite inputs fire it); the atomic dQ path checks each tile's product next
// to its atomics and recomputes flagged elements from the tile in shared memory. A warp works on
// one row at a time; lane l holds head dims 64 c + 2 l, +1 (c < kHeadDim / 64).

// NaN or +-inf.
__device__ __forceinline__ bool nonfinite(float x) { return !(fabsf(x) < INFINITY); }

template <int kHeadDim>
using RowSlice = float[kHeadDim / 32];

// This lane's slice of a global row of kHeadDim 16-bit elements, as floats.
template <class Elem, int kHeadDim>
__device__ __forceinline__ void load_row_slice(const uint16_t* row, RowSlice<kHeadDim>& x) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
  for (int c = 0; c < kHeadDim / 64; ++c) {
    const float2 pair = unpack_pair<Elem>(ld_global_u32(reinterpret_cast<const uint32_t*>(row + 64 * c + 2 * lane)));
    x[2 * c] = pair.x;
    x[2 * c + 1] = pair.y;
  }
}

// The dot product of two rows held as slices, in every lane.
template <int kHeadDim>
__device__ __forceinline__ float warp_dot(const RowSlice<kHeadDim>& a, const RowSlice<kHeadDim>& b) {
  float dot = 0.f;
#pragma unroll
  for (int e = 0; e < kHeadDim / 32; ++e) dot += a[e] * b[e];
#pragma unroll
  for (int m = 16; m > 0; m /= 2) dot += warp_shfl_xor(dot, m);
  return dot;
}

// Stores a row slice (times mul, non-finite as NaN) as row r of a [row][kHeadDim] tile.
template <class Tile, class Elem, int kHeadDim>
__device__ __forceinline__ void store_row_slice(uint32_t tile, int r, const RowSlice<kHeadDim>& x, float mul) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
  for (int c = 0; c < kHeadDim / 64; ++c) {
    store_pair<Tile, Elem>(tile, r, 8 * c + lane / 4, nan_if_infinite(x[2 * c] * mul),
                           nan_if_infinite(x[2 * c + 1] * mul));
  }
}

// Bit r (r < 16) set when row r of a 16-row mma tile is flagged by some lane of its quad (each lane
// passes its flags of rows g and g + 8); the same in every lane. Float sums of distinct powers of two
// below 2^16 are exact whatever the order.
__device__ __forceinline__ uint32_t flagged_rows(bool flag_g, bool flag_g8) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
  float lo = flag_g ? 1.f : 0.f, hi = flag_g8 ? 1.f : 0.f;
#pragma unroll
  for (int m = 1; m < 4; m *= 2) {
    lo = fmaxf(lo, warp_shfl_xor(lo, m));
    hi = fmaxf(hi, warp_shfl_xor(hi, m));
  }
  float bits = lane % 4 == 0 ? lo * static_cast<float>(1u << (lane / 4)) + hi * static_cast<float>(1u << (lane / 4 + 8))
                             : 0.f;
#pragma unroll
  for (int m = 1; m < 32; m *= 2) bits += warp_shfl_xor(bits, m);
  return static_cast<uint32_t>(bits);
}

// Output row i (normalised; lse2 = its lse in log2 units) over exactly the keys it sees:
// o = sum_j 2^(x_ij - lse2) v_j, in IEEE arithmetic.
template <class Elem, int kHeadDim>
__device__ __forceinline__ void seen_output_row(const AttnParams& p, const SeqSlice& seq, const ScoreTransform& score,
                                                int i, const uint16_t* q_row, const uint16_t* k, const uint16_t* v,
                                                const uint32_t* key_bits, float lse2, RowSlice<kHeadDim>& o) {
  RowSlice<kHeadDim> qv;
  load_row_slice<Elem, kHeadDim>(q_row, qv);
#pragma unroll
  for (int e = 0; e < kHeadDim / 32; ++e) o[e] = 0.f;
  int lo, hi;
  visible_keys(p, seq, i, 1, lo, hi);
#pragma unroll 1
  for (int j = lo; j < hi; ++j) {
    if (!is_token(key_bits, j, seq.len_k)) continue;
    RowSlice<kHeadDim> kv, vv;
    load_row_slice<Elem, kHeadDim>(k + j * p.k_row_stride, kv);
    load_row_slice<Elem, kHeadDim>(v + j * p.v_row_stride, vv);
    const float prob = fast_exp2(score.log2_units(score.stored(warp_dot<kHeadDim>(qv, kv))) - lse2);
#pragma unroll
    for (int e = 0; e < kHeadDim / 32; ++e) o[e] += prob * vv[e];
  }
}

template <class Elem_, int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_, int kStages_>
struct FwdConfig {
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_;
  static constexpr int kWarps = kWarps_, kStages = kStages_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kWarpRows = kBlockM / kWarps;
  static constexpr int kMTiles = kWarpRows / 16;
  using QTile = SmemTile<kBlockM, kHeadDim>;
  using KVTile = SmemTile<kBlockN, kHeadDim>;
  static constexpr int kSmemBytes = QTile::kBytes + 2 * kStages * KVTile::kBytes;

  static_assert(kBlockM % (16 * kWarps) == 0, "each warp owns whole 16-row mma tiles");
  static_assert(kBlockN % 32 == 0 && 128 % kBlockN == 0, "key tiles cover whole words of the mask bits");
  static_assert(kBlockM % 32 == 0 && 128 % kBlockM == 0, "query tiles cover whole words of the mask bits");
  static_assert(kHeadDim % 64 == 0, "head dim must fill swizzled 128-byte rows");
  static_assert(kStages >= 2, "the ring needs at least double buffering");
};

// The K and V tiles a query block walks (tiles without a real key skipped), streamed through a
// kStages-deep cp.async ring; shared by the forward and the dQ kernel. Padding keys land as zeros. Commit groups stay exact:
// prime() commits kStages-1 groups (copies issued just before it join group 0; groups with no
// tile left are empty) and every acquire() commits one more.
template <class Cfg>
struct KeyTileRing {
  using KVTile = typename Cfg::KVTile;
  static constexpr int kBlockN = Cfg::kBlockN, kStages = Cfg::kStages, kThreads = Cfg::kThreads;

  const AttnParams& p;  // strides stay in the kernel's parameter space, not in registers
  const SeqSlice& seq;
  const uint16_t* k;
  const uint16_t* v;
  const uint32_t* key_bits;
  uint32_t sK, sV;  // kStages tiles each
  int end;          // one past the last tile
  int next_load;    // the next tile to prefetch

  // The tile after `tile` that holds a real key (end if none).
  __device__ __forceinline__ int after(int tile) const {
    return next_tile_with_tokens<kBlockN>(key_bits, tile + 1, end);
  }

  __device__ __forceinline__ void prime() {
#pragma unroll
    for (int stage = 0; stage < kStages - 1; ++stage) prefetch(stage);
  }

  // Waits until the tile of iteration `it` has landed (at most kStages-2 younger groups pending)
  // and every warp is done with the stage the prefetch overwrites (computed in iteration it-1);
  // returns the byte offset of that tile's stage.
  __device__ __forceinline__ uint32_t acquire(int it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    prefetch((it + kStages - 1) % kStages);
    return (it % kStages) * KVTile::kBytes;
  }

  // Rows n0.. of a K or V tensor (base = its row 0) into `tile`, the rows whose bit is clear (padding, past
  // the sequence) as zeros. A thread's rows are kRowStep apart: one pointer stepped from row to row and the
  // tile's bit words tested at fixed positions, so no per-row offsets stay live across the caller's loop.
  __device__ __forceinline__ static void copy_rows(uint32_t tile, const uint16_t* base, int64_t row_stride, int n0,
                                                   const TileBits<kBlockN>& bits) {
    constexpr int kRowStep = kThreads / KVTile::kChunks;
    static_assert(kBlockN % kRowStep == 0 && kThreads % KVTile::kChunks == 0, "every thread copies whole chunk columns");
    static_assert(kRowStep % 8 == 0, "rows a thread copies share one swizzle");
    static_assert(32 % kRowStep == 0, "a thread's rows sit at fixed bits of the words");
    const int row = static_cast<int>(threadIdx.x) / KVTile::kChunks;
    const int chunk = static_cast<int>(threadIdx.x) % KVTile::kChunks;
    const uint32_t dst = tile + KVTile::offset(row, chunk);
    const uint16_t* src = base + static_cast<int64_t>(n0 + row) * row_stride + chunk * 8;
    const int64_t step = kRowStep * row_stride;
    uint32_t row_bits[TileBits<kBlockN>::kWords];  // bit i * kRowStep % 32: row row + i * kRowStep
#pragma unroll
    for (int w = 0; w < TileBits<kBlockN>::kWords; ++w) row_bits[w] = bits.word[w] >> row;
#pragma unroll
    for (int i = 0; i < kBlockN / kRowStep; ++i) {
      const bool valid = (row_bits[i * kRowStep / 32] >> (i * kRowStep % 32)) & 1u;
      cp_async_16(dst + i * kRowStep * KVTile::kRowBytes, valid ? src : base, valid);
      src += step;
    }
  }

  __device__ __forceinline__ void prefetch(int stage) {
    if (next_load < end) {
      const int n0 = next_load * kBlockN;
      TileBits<kBlockN> bits;
      bits.load(key_bits, n0, seq.len_k);
      copy_rows(sK + stage * KVTile::kBytes, k, p.k_row_stride, n0, bits);
      copy_rows(sV + stage * KVTile::kBytes, v, p.v_row_stride, n0, bits);
      next_load = after(next_load);
    }
    cp_async_commit();
  }
};

// What block (m_block, h, b) of the forward reads and writes: its sequence, query rows and tensor slices.
struct FwdBlock {
  SeqSlice seq;
  int m0, rows;
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  float* lse;
  const uint32_t* key_bits;
  const uint32_t* query_bits;
};

template <int kBlockM>
__device__ __forceinline__ FwdBlock fwd_block(const FwdParams& p, int m_block, int h, int b) {
  FwdBlock blk;
  blk.seq = seq_slice(p, b);
  blk.m0 = m_block * kBlockM;
  blk.rows = min(kBlockM, blk.seq.len_q - blk.m0);
  const int hk = h / p.group, q_token = blk.seq.q_token0 + blk.m0;
  blk.q = static_cast<const uint16_t*>(p.q) +
          token_offset(p.q_batch_stride, p.q_row_stride, p.q_head_stride, b, q_token, h);
  blk.k = static_cast<const uint16_t*>(p.k) +
          token_offset(p.k_batch_stride, p.k_row_stride, p.k_head_stride, b, blk.seq.k_token0, hk);
  blk.v = static_cast<const uint16_t*>(p.v) +
          token_offset(p.v_batch_stride, p.v_row_stride, p.v_head_stride, b, blk.seq.k_token0, hk);
  blk.out = static_cast<uint16_t*>(p.out) +
            token_offset(p.o_batch_stride, p.o_row_stride, p.o_head_stride, b, q_token, h);
  blk.lse = p.lse + lse_offset(p, b, h, q_token);
  blk.key_bits = p.key_bits != nullptr ? p.key_bits + static_cast<int64_t>(b) * p.key_bits_stride : nullptr;
  blk.query_bits = p.query_rows_masked ? blk.key_bits : nullptr;
  return blk;
}

template <class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) fwd_kernel(const FwdParams p) {
  using Elem = typename Cfg::Elem;
  using QTile = typename Cfg::QTile;
  using KVTile = typename Cfg::KVTile;
  constexpr int D = Cfg::kHeadDim, BM = Cfg::kBlockM, BN = Cfg::kBlockN;
  constexpr int kMT = Cfg::kMTiles, kNT = BN / 8, kDT = D / 8, kThreads = Cfg::kThreads, kStages = Cfg::kStages;

  const FwdBlock blk = fwd_block<BM>(p, blockIdx.x, blockIdx.y, blockIdx.z);
  if (blk.m0 >= blk.seq.len_q) return;
  const SeqSlice& seq = blk.seq;
  const int m0 = blk.m0, rows = blk.rows;
  const uint32_t* key_bits = blk.key_bits;
  const uint32_t* query_bits = blk.query_bits;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;

  // Key tiles [t_first, t_hi) hold every key some real row of this block may see.
  int n_lo, n_hi, t_first, t_hi;
  visible_keys(p, seq, m0, rows, n_lo, n_hi);
  tile_walk<BM, BN>(n_lo, n_hi, query_bits, m0, key_bits, t_first, t_hi);

  if (t_first >= t_hi) {  // no row of this block sees a key: zeros, lse = -inf
    zero_rows_global<D, kThreads>(blk.out, p.o_row_stride, rows);
    for (int r = static_cast<int>(threadIdx.x); r < rows; r += kThreads) st_global_f32(blk.lse + r, -INFINITY);
    return;
  }

  const uint32_t sQ = dynamic_smem();
  const uint32_t sK = sQ + QTile::kBytes;  // kStages tiles
  const uint32_t sV = sK + kStages * KVTile::kBytes;

  // Group 0 = Q + the first K/V tile; groups 1 .. kStages-2 = the next tiles (possibly empty).
  copy_tile_async<QTile, kThreads>(sQ, blk.q, p.q_row_stride, rows);
  KeyTileRing<Cfg> ring{p, seq, blk.k, blk.v, key_bits, sK, sV, t_hi, t_first};
  ring.prime();

  // Scores arrive in log2 units: x = s * scale * log2(e), or with a soft cap
  // x = softcap * log2(e) * tanh(s * scale / softcap).
  // Uncapped with a positive scale the scores stay raw instead: the max of raw scores is the max of scaled
  // ones, and P = 2^(s mul - m mul) is one FFMA per score (exp_mul = mul; else exp_mul = 1 on log2 units).
  const bool capped = p.softcap > 0.f;
  const float score_mul = capped ? p.scale / p.softcap : p.scale * kLog2e;
  const float cap_log2 = p.softcap * kLog2e;
  const bool fold_scale = !capped && score_mul > 0.f;
  const float exp_mul = fold_scale ? score_mul : 1.f;

  const int warp_row0 = warp * Cfg::kWarpRows;  // first row of this warp within the tile
  const LdsmAddr<QTile> q_frag = a_operand<QTile>(sQ);
  const LdsmAddr<KVTile> k_frag = b_operand<KVTile>(sK);
  const LdsmAddr<KVTile> v_frag = b_operand_trans<KVTile>(sV);
  float acc_o[kMT][kDT][4];
  float row_max[kMT][2], row_sum[kMT][2];  // per (m tile, half): rows g and g + 8
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
    }
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      row_max[mt][hf] = -INFINITY;
      row_sum[mt][hf] = 0.f;
    }
  }

  int tile = t_first;
  for (int it = 0; tile < t_hi; ++it) {
    const uint32_t stage_bytes = ring.acquire(it);
    const LdsmAddr<KVTile> k_stage = k_frag.plus(stage_bytes);
    const LdsmAddr<KVTile> v_stage = v_frag.plus(stage_bytes);
    const int n0 = tile * BN;

    // S = Q K^T for this warp's rows.
    float acc_s[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = 0.f;
      }
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) load_a(a[mt], q_frag, warp_row0 + mt * 16, 2 * kk);
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t bk[4];
        load_b_pair(bk, k_stage, np * 16, 2 * kk);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<Elem>(acc_s[mt][2 * np], a[mt], bk[0], bk[1]);
          mma_16816<Elem>(acc_s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // Scores in log2 units unless the scale folds into the exponent (branches per tile, not per score).
    if (!fold_scale) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] *= score_mul;
        }
      }
      if (capped) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = cap_log2 * accurate_tanh(acc_s[mt][nt][e]);
          }
        }
      }
    }

    // Mask keys that are padding, past the sequence, or outside the window; interior tiles skip this.
    TileBits<BN> bits;
    bits.load(key_bits, n0, seq.len_k);
    if (!bits.all() || !window_covers_tile(p, seq, m0, BM, n0, BN)) {
      // Branch-free: per row its window as offsets from this lane's first key j0 = n0 + 2 (lane % 4), and
      // the bit words shifted by 2 (lane % 4), so element (nt, c) tests fixed bits. The lane and row come
      // from an opaque thread index: recomputed here, not hoisted into registers held across the loop.
      const int thread = static_cast<int>(opaque(threadIdx.x)), quad_lane = thread % 4;
      const int row_base = m0 + thread / 32 * Cfg::kWarpRows + thread % 32 / 4;
      uint32_t lane_bits[TileBits<BN>::kWords];
#pragma unroll
      for (int w = 0; w < TileBits<BN>::kWords; ++w) lane_bits[w] = bits.word[w] >> (2 * quad_lane);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int i_rel = row_base + mt * 16 + 8 * hf + seq.offset - n0 - 2 * quad_lane;
          const int lo = i_rel - p.window_left, hi = i_rel + p.window_right;  // seen: lo <= j - j0 <= hi
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
              const int dj = 8 * nt + c;  // j - j0
              const bool seen = ((lane_bits[nt / 4] >> ((nt % 4) * 8 + c)) & 1u) & (dj >= lo) & (dj <= hi);
              acc_s[mt][nt][2 * hf + c] = seen ? acc_s[mt][nt][2 * hf + c] : -INFINITY;
            }
          }
        }
      }
    }

    // Online softmax: new row max, rescale what was accumulated, P = 2^((x - max) exp_mul) (row_max in
    // the scores' units).
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = row_max[mt][hf];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(acc_s[mt][nt][2 * hf], acc_s[mt][nt][2 * hf + 1]));
        mx = fmaxf(mx, warp_shfl_xor(mx, 1));  // the 4 lanes of a quad share a row
        mx = fmaxf(mx, warp_shfl_xor(mx, 2));
        // A row that has seen only masked keys keeps max -inf; subtract 0 instead (no -inf - -inf).
        const float m_use = mx == -INFINITY ? 0.f : mx;
        const float m_scaled = m_use * exp_mul;
        const float correction = fast_exp2(fmaf(row_max[mt][hf], exp_mul, -m_scaled));  // 0 while the old max is -inf
        row_max[mt][hf] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 2 * hf; e < 2 * hf + 2; ++e) {
            acc_s[mt][nt][e] = fast_exp2(fmaf(acc_s[mt][nt][e], exp_mul, -m_scaled));
            sum += acc_s[mt][nt][e];
          }
        }
        row_sum[mt][hf] = row_sum[mt][hf] * correction + sum;  // this lane's partial sum; reduced at the end
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          acc_o[mt][dt][2 * hf] *= correction;
          acc_o[mt][dt][2 * hf + 1] *= correction;
        }
      }
    }

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) accumulators_to_a<Elem>(a[mt], acc_s[mt][2 * kk], acc_s[mt][2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t bv[4];
        load_b_pair_trans(bv, v_stage, kk * 16, 2 * dp);
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<Elem>(acc_o[mt][2 * dp], a[mt], bv[0], bv[1]);
          mma_16816<Elem>(acc_o[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
    tile = ring.after(tile);
  }
  cp_async_wait<0>();  // only empty groups can remain

  // The epilogue's slices come from opaque block indices: recomputed here (a few loads and multiplies once
  // per block) rather than kept in registers across the key loop, which needs every one it can get.
  const FwdBlock fin = fwd_block<BM>(p, opaque(blockIdx.x), opaque(blockIdx.y), opaque(blockIdx.z));

  // Normalise; padded query rows (and rows that saw no key) get zeros and lse = -inf.
  __syncwarp();  // this warp's reads of its Q rows are done before they are overwritten with O
  static_assert(16 * kMT <= 32, "one bit per row of the warp");
  uint32_t redo_rows = 0;  // bit r: row warp_row0 + r holds a non-finite value, maybe from 0 * NaN
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
    bool redo[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float sum = row_sum[mt][hf];
      sum += warp_shfl_xor(sum, 1);
      sum += warp_shfl_xor(sum, 2);
      const int r = warp_row0 + mt * 16 + lane / 4 + 8 * hf;  // row within the tile
      const bool valid = is_token(fin.query_bits, fin.m0 + r, fin.seq.len_q);
      // sum is 0 exactly on rows that saw no key or only -inf scores, NaN on rows with a NaN or +inf score.
      // Zeros are selected, not multiplied in: acc may hold NaN from a padding row's own q.
      const bool row_ok = valid && sum != 0.f;
      const float inv = 1.f / sum;
      const float row_lse = row_ok ? (row_max[mt][hf] * exp_mul + log2f(sum)) * kLn2 : -INFINITY;
      if (lane % 4 == 0 && r < fin.rows) st_global_f32(fin.lse + r, row_lse);
      bool row_nonfinite = false;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        row_nonfinite = row_nonfinite || nonfinite(acc_o[mt][dt][2 * hf]) || nonfinite(acc_o[mt][dt][2 * hf + 1]);
        store_pair<QTile, Elem>(sQ, r, dt, row_ok ? nan_if_infinite(acc_o[mt][dt][2 * hf] * inv) : 0.f,
                                row_ok ? nan_if_infinite(acc_o[mt][dt][2 * hf + 1] * inv) : 0.f);
      }
      // A NaN sum (a NaN or +inf score) makes every element NaN already, as it should.
      redo[hf] = row_ok && sum == sum && row_nonfinite;
    }
    redo_rows |= flagged_rows(redo[0], redo[1]) << (16 * mt);
  }
  __syncwarp();
  if (redo_rows != 0) {  // the exact slow path, over the rows' staged output (lse is exact already)
    const ScoreTransform score(p);
#pragma unroll 1
    for (int wr = 0; wr < Cfg::kWarpRows; ++wr) {
      if (!((redo_rows >> wr) & 1u)) continue;
      const int r = warp_row0 + wr;
      RowSlice<D> o;
      seen_output_row<Elem, D>(p, fin.seq, score, fin.m0 + r, fin.q + r * p.q_row_stride, fin.k, fin.v, fin.key_bits,
                               ld_global_f32(fin.lse + r) * kLog2e, o);
      store_row_slice<QTile, Elem, D>(sQ, r, o, 1.f);
    }
    __syncwarp();
  }
  copy_rows_to_global<QTile, Cfg::kWarpRows>(sQ, warp_row0, fin.out, p.o_row_stride, fin.rows);
}

}  // namespace l2vf
