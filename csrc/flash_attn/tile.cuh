// Shared-memory tiles of 16-bit elements: the swizzled layout, the global <-> shared copies, and
// the ldmatrix addressing that turns a tile into mma fragments. Shared memory is addressed with
// 32-bit shared-window addresses (see ptx.cuh); every tile starts 128-byte aligned.
#pragma once

#include <cstdint>

#include "ptx.cuh"

namespace l2vf {

// A kRows x kCols tile of 16-bit elements, row-major, each row split into 16-byte chunks of 8
// elements. Logical chunk c of row r is stored at chunk c ^ swizzle(r), where swizzle(r) = r % 8
// for rows of >= 8 chunks and (r / 2) % 4 for rows of 4 chunks: eight consecutive rows read at one
// logical chunk (what ldmatrix does) then hit eight different 16-byte bank groups, and a warp's
// 16-byte copies of whole rows fill every bank once: neither conflicts.
template <int kRows, int kCols>
struct SmemTile {
  static_assert(kCols == 32 || kCols % 64 == 0, "rows of 4 chunks, or a multiple of 8 chunks (128 bytes)");
  static_assert(kRows % 16 == 0, "tiles hold whole 16-row mma tiles");
  static constexpr int kRowsN = kRows;
  static constexpr int kChunks = kCols / 8;
  static constexpr int kRowBytes = kCols * 2;
  static constexpr int kBytes = kRows * kRowBytes;
  static constexpr int kSwizzleMask = kChunks >= 8 ? 7 : 3;  // the chunk bits the swizzle flips

  __device__ __forceinline__ static constexpr int swizzle(int row) { return kChunks >= 8 ? row & 7 : (row >> 1) & 3; }
  // Byte offset of logical chunk `chunk` of row `row`.
  __device__ __forceinline__ static constexpr uint32_t offset(int row, int chunk) {
    return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ swizzle(row)) << 4));
  }
};

// The per-lane addresses of an ldmatrix.x4 over 16 rows x 2 chunks of a tile. Lane l reads row
// row0 + r(l), logical chunk chunk0 + c(l), with (r, c) = (l % 16, l / 16) ("rows16": matrices
// 0..3 = (rows 0-7, c0), (rows 8-15, c0), (rows 0-7, c0+1), (rows 8-15, c0+1)) or
// (l % 8 + 8 (l / 16), (l / 8) % 2) ("rows8x2": (rows 0-7, c0), (rows 0-7, c0+1), (rows 8-15, c0),
// (rows 8-15, c0+1)). For row0 a multiple of 8 and chunk0 even, the swizzled address is
//   tile + row0 * rowbytes + 16 * (chunk0 & ~mask) + (lane_base ^ 16 * (chunk0 & mask)),
// lane_base = r * rowbytes + 16 * (c ^ swizzle(r)): one register per pattern, and each fragment
// an immediate XOR and add, so the compiler has no per-fragment addresses to keep alive.
template <class Tile>
struct LdsmAddr {
  uint32_t lane_base;  // tile address + lane_base as above

  __device__ __forceinline__ LdsmAddr(uint32_t tile, bool rows16) {
    const int lane = static_cast<int>(threadIdx.x) & 31;
    const int r = rows16 ? (lane & 15) : (lane & 7) + ((lane >> 4) << 3);
    const int c = rows16 ? (lane >> 4) : ((lane >> 3) & 1);
    lane_base = tile + Tile::offset(r, c);
  }
  // The XOR goes first: it flips address bits below those the row and high-chunk offset add to, so both
  // orders agree, and this one leaves one XOR per low chunk (shared by every row) and the rest immediates.
  __device__ __forceinline__ uint32_t at(int row0, int chunk0) const {
    return (lane_base ^ static_cast<uint32_t>((chunk0 & Tile::kSwizzleMask) << 4)) +
           static_cast<uint32_t>(row0 * Tile::kRowBytes + ((chunk0 & ~Tile::kSwizzleMask) << 4));
  }
  // The same pattern over the tile `bytes` further on (another stage of a ring).
  __device__ __forceinline__ LdsmAddr plus(uint32_t bytes) const {
    LdsmAddr r = *this;
    r.lane_base += bytes;
    return r;
  }
};

// Operands are named as in d = a @ b, a (M x K), b (K x N). A tile stored [m][k] (k contiguous)
// gives A with plain ldmatrix (rows16); stored [k][m], A through .trans (rows8x2). A tile stored
// [n][k] gives B with plain ldmatrix (rows8x2: b[0..1] = n rows 0-7, b[2..3] = n rows 8-15);
// stored [k][n], B through .trans (rows16: b[0..1] = n chunk c0, b[2..3] = n chunk c0+1).
template <class Tile>
__device__ __forceinline__ LdsmAddr<Tile> a_operand(uint32_t tile) { return LdsmAddr<Tile>(tile, true); }
template <class Tile>
__device__ __forceinline__ LdsmAddr<Tile> a_operand_trans(uint32_t tile) { return LdsmAddr<Tile>(tile, false); }
template <class Tile>
__device__ __forceinline__ LdsmAddr<Tile> b_operand(uint32_t tile) { return LdsmAddr<Tile>(tile, false); }
template <class Tile>
__device__ __forceinline__ LdsmAddr<Tile> b_operand_trans(uint32_t tile) { return LdsmAddr<Tile>(tile, true); }

// A fragment (16 x 16) of rows row0.., columns 8 * chunk0 .. 8 * chunk0 + 15.
template <class Tile>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const LdsmAddr<Tile>& addr, int row0, int chunk0) {
  ldmatrix_x4(a, addr.at(row0, chunk0));
}
// A fragment of the transpose of a [k][m] tile: k rows krow0..krow0+15, m columns 8 * mchunk0 .. +15.
template <class Tile>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const LdsmAddr<Tile>& addr, int krow0, int mchunk0) {
  ldmatrix_x4_trans(a, addr.at(krow0, mchunk0));
}
// B fragments of two adjacent n8 tiles from a [n][k] tile: n rows nrow0..nrow0+15, k columns 8 * kchunk0 .. +15.
template <class Tile>
__device__ __forceinline__ void load_b_pair(uint32_t (&b)[4], const LdsmAddr<Tile>& addr, int nrow0, int kchunk0) {
  ldmatrix_x4(b, addr.at(nrow0, kchunk0));
}
// B fragments of two adjacent n8 tiles from a [k][n] tile: k rows krow0..krow0+15, n columns 8 * nchunk0 .. +15.
template <class Tile>
__device__ __forceinline__ void load_b_pair_trans(uint32_t (&b)[4], const LdsmAddr<Tile>& addr, int krow0,
                                                  int nchunk0) {
  ldmatrix_x4_trans(b, addr.at(krow0, nchunk0));
}

// The accumulator fragments of two adjacent n8 tiles (16 x 16 floats) as the A fragment of a
// 16 x 16 operand (k = the accumulator's columns): the C layout of tiles 2k and 2k+1 is exactly
// the A layout of columns 16k..16k+15.
template <class Elem>
__device__ __forceinline__ void accumulators_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack_pair<Elem>(c0[0], c0[1]);
  a[1] = pack_pair<Elem>(c0[2], c0[3]);
  a[2] = pack_pair<Elem>(c1[0], c1[1]);
  a[3] = pack_pair<Elem>(c1[2], c1[3]);
}

// Stores an accumulator pair into a tile: elements (row, 8 * chunk + 2q + {0, 1}), q = lane % 4.
template <class Tile, class Elem>
__device__ __forceinline__ void store_pair(uint32_t tile, int row, int chunk, float v0, float v1) {
  const int q = static_cast<int>(threadIdx.x) & 3;
  st_shared_u32(tile + Tile::offset(row, chunk) + 4 * q, pack_pair<Elem>(v0, v1));
}

// Element (row, col) of a tile, as a float (a scalar read for the rare exact paths).
template <class Tile, class Elem>
__device__ __forceinline__ float ld_shared_elem(uint32_t tile, int row, int col) {
  const uint4 chunk = ld_shared_16(tile + Tile::offset(row, col / 8));
  const int word = (col % 8) / 2;
  const float2 pair = unpack_pair<Elem>(word == 0 ? chunk.x : word == 1 ? chunk.y : word == 2 ? chunk.z : chunk.w);
  return col % 2 == 0 ? pair.x : pair.y;
}

// Asynchronously copies rows [0, rows_valid) of a global tile (rows `row_stride` elements apart,
// 16-byte aligned) into `tile`, zero-filling the rows past rows_valid (rows_valid >= 1: row 0 is
// the source address of the zero-filling copies, which read nothing). One 16-byte chunk per
// thread per step: a warp covers whole row segments, coalesced in global memory, conflict-free in
// shared memory. A thread keeps one chunk column, and its rows are kThreads / kChunks apart (a
// multiple of 8, so the swizzle stays the same and the shared addresses are immediates apart).
template <class Tile, int kThreads>
__device__ __forceinline__ void copy_tile_async(uint32_t tile, const uint16_t* gmem, int64_t row_stride,
                                                int rows_valid) {
  constexpr int kTotal = Tile::kRowsN * Tile::kChunks;
  constexpr int kRowStep = kThreads / Tile::kChunks;
  static_assert(kTotal % kThreads == 0 && kThreads % Tile::kChunks == 0, "every thread copies whole chunk columns");
  static_assert(kRowStep % 8 == 0, "rows a thread copies share one swizzle");
  const int row = static_cast<int>(threadIdx.x) / Tile::kChunks;
  const int chunk = static_cast<int>(threadIdx.x) % Tile::kChunks;
  const uint32_t dst = tile + Tile::offset(row, chunk);
  const uint16_t* src = gmem + row * row_stride + chunk * 8;
#pragma unroll
  for (int i = 0; i < kTotal / kThreads; ++i) {
    const bool valid = row + i * kRowStep < rows_valid;
    cp_async_16(dst + i * kRowStep * Tile::kRowBytes, valid ? src + i * kRowStep * row_stride : gmem, valid);
  }
}

// copy_tile_async, also zero-filling the rows whose bit is clear in the packed-bit row `bits` (bit
// row0 + r for tile row r; no mask when bits is null): padding keys or queries land as zeros, so that
// no NaN/inf they hold can reach a product through a zero weight (0 * NaN).
template <class Tile, int kThreads>
__device__ __forceinline__ void copy_real_rows_async(uint32_t tile, const uint16_t* gmem, int64_t row_stride,
                                                     int rows_valid, const uint32_t* bits, int row0) {
  constexpr int kTotal = Tile::kRowsN * Tile::kChunks;
  constexpr int kRowStep = kThreads / Tile::kChunks;
  static_assert(kTotal % kThreads == 0 && kThreads % Tile::kChunks == 0, "every thread copies whole chunk columns");
  static_assert(kRowStep % 8 == 0, "rows a thread copies share one swizzle");
  const int row = static_cast<int>(threadIdx.x) / Tile::kChunks;
  const int chunk = static_cast<int>(threadIdx.x) % Tile::kChunks;
  const uint32_t dst = tile + Tile::offset(row, chunk);
  const uint16_t* src = gmem + row * row_stride + chunk * 8;
#pragma unroll
  for (int i = 0; i < kTotal / kThreads; ++i) {
    const int r = row + i * kRowStep;
    const bool valid = r < rows_valid && (bits == nullptr || ((ld_global_u32(bits + (row0 + r) / 32) >> ((row0 + r) % 32)) & 1u));
    cp_async_16(dst + i * kRowStep * Tile::kRowBytes, valid ? src + i * kRowStep * row_stride : gmem, valid);
  }
}

// Copies kCount floats into shared memory (one per thread, 4-byte aligned), zero past `valid`.
template <int kCount>
__device__ __forceinline__ void copy_floats_async(uint32_t smem, const float* gmem, int valid) {
  const int i = static_cast<int>(threadIdx.x);
  if (i < kCount) cp_async_4(smem + 4 * i, i < valid ? gmem + i : gmem, i < valid);
}

// Copies tile rows [row0, row0 + kRows) to global memory rows row0.. (16-byte stores), skipping
// rows >= rows_valid. Run by the one warp that owns those rows.
template <class Tile, int kRows>
__device__ __forceinline__ void copy_rows_to_global(uint32_t tile, int row0, uint16_t* gmem, int64_t row_stride,
                                                    int rows_valid) {
  constexpr int kTotal = kRows * Tile::kChunks;
  static_assert(kTotal % 32 == 0, "a warp copies whole 32-chunk steps");
  const int lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
  for (int i = 0; i < kTotal / 32; ++i) {
    const int idx = lane + 32 * i;
    const int r = row0 + idx / Tile::kChunks;
    const int chunk = idx % Tile::kChunks;
    if (r < rows_valid) st_global_16(gmem + r * row_stride + chunk * 8, ld_shared_16(tile + Tile::offset(r, chunk)));
  }
}

// Writes zeros to rows [0, rows) of a global (rows x kCols) tile, all threads of the block.
template <int kCols, int kThreads>
__device__ __forceinline__ void zero_rows_global(uint16_t* gmem, int64_t row_stride, int rows) {
  constexpr int kChunks = kCols / 8;
  for (int idx = static_cast<int>(threadIdx.x); idx < rows * kChunks; idx += kThreads) {
    st_global_16(gmem + (idx / kChunks) * row_stride + (idx % kChunks) * 8, make_uint4(0u, 0u, 0u, 0u));
  }
}

}  // namespace l2vf
