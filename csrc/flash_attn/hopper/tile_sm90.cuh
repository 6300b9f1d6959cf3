// Shared-memory tiles as TMA writes them with 128-byte swizzling, and the wgmma operand
// descriptors that read them.
//
// A kRows x kCols tile of 16-bit elements is kCols / 64 column panels, each kRows rows of 128
// bytes (one TMA box of 64 columns); chunk c (16 bytes) of row r of a panel sits at c ^ (r % 8).
// Every panel starts 1024-byte aligned, so the hardware swizzle (address bits 4-6 XOR bits 7-9)
// and this layout agree. The interface is SmemTile's (tile.cuh): its row copies and stores work
// on these tiles unchanged.
#pragma once

#include <cstdint>

#include "../ptx.cuh"
#include "../ptx_sm90.cuh"

namespace l2vf {

template <int kRows, int kCols>
struct SwizzledPanels {
  static_assert(kCols % 64 == 0, "whole 64-column (128-byte) panels");
  static_assert(kRows % 8 == 0, "whole 8-row swizzle atoms");
  static constexpr int kRowsN = kRows;
  static constexpr int kPanels = kCols / 64;
  static constexpr int kChunks = kCols / 8;
  static constexpr int kPanelBytes = kRows * 128;
  static constexpr int kBytes = kPanels * kPanelBytes;
  static constexpr int kRowBytes = 128;  // within a panel

  // Byte offset of logical chunk `chunk` (8 elements) of row `row`.
  __host__ __device__ __forceinline__ static constexpr uint32_t offset(int row, int chunk) {
    return static_cast<uint32_t>((chunk / 8) * kPanelBytes + row * 128 + (((chunk % 8) ^ (row % 8)) << 4));
  }

  // Operand of a k16 step read along the rows' contiguous dimension ("K-major": Q and K in S = Q K^T):
  // rows row0.. (a multiple of 8), columns 16 kstep .. 16 kstep + 15. The 8-row atoms are 1024 bytes apart.
  __device__ __forceinline__ static uint64_t k_major(uint32_t tile, int row0, int kstep) {
    const uint32_t addr = tile + (kstep / 4) * kPanelBytes + row0 * 128 + (kstep % 4) * 32;
    return make_smem_desc(addr, Swizzle::k128B, /*leading_bytes=*/16, /*stride_bytes=*/1024);
  }

  // Operand of a k16 step whose k runs down the rows ("MN-major": V in O = P V, k = keys, n = columns):
  // rows 16 kstep .. 16 kstep + 15, every column. Panels (64 columns each) are kPanelBytes apart along n,
  // 8-row groups 1024 bytes apart along k.
  __device__ __forceinline__ static uint64_t mn_major(uint32_t tile, int kstep) {
    return make_smem_desc(tile + kstep * 16 * 128, Swizzle::k128B, /*leading_bytes=*/kPanelBytes,
                          /*stride_bytes=*/1024);
  }
};

// Columns 16 s .. 16 s + 15 of a wgmma accumulator (its n8 tiles 2 s and 2 s + 1) as the A operand of
// an RS wgmma (ptx_sm90.cuh: the accumulator rows of a warp are the A rows of the same warp).
template <class Elem, int kCount>
__device__ __forceinline__ void accumulator_cols_to_a(uint32_t (&a)[4], const float (&d)[kCount], int s) {
  a[0] = pack_pair<Elem>(d[8 * s], d[8 * s + 1]);
  a[1] = pack_pair<Elem>(d[8 * s + 2], d[8 * s + 3]);
  a[2] = pack_pair<Elem>(d[8 * s + 4], d[8 * s + 5]);
  a[3] = pack_pair<Elem>(d[8 * s + 6], d[8 * s + 7]);
}

}  // namespace l2vf
