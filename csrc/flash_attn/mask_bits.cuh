// Packs a (batch, seqlen_k) bool key-padding mask into the bit rows the attention kernels read
// (AttnParams::key_bits): one thread per 32-bit word, zero past seqlen_k. Included by
// mask_bits.cu alone (a non-template kernel: one definition).
#pragma once

#include <cstdint>

#include "params.h"
#include "ptx.cuh"

namespace l2vf {

constexpr int kPackThreads = 256;

inline dim3 pack_key_bits_grid(const MaskParams& p) {
  const int64_t words = static_cast<int64_t>(p.batch) * p.words_per_row;
  return dim3(static_cast<unsigned>((words + kPackThreads - 1) / kPackThreads));
}

__global__ void __launch_bounds__(kPackThreads) pack_key_bits_kernel(const MaskParams p) {
  const int64_t word = static_cast<int64_t>(blockIdx.x) * kPackThreads + threadIdx.x;
  if (word >= static_cast<int64_t>(p.batch) * p.words_per_row) return;
  const int b = static_cast<int>(word / p.words_per_row);
  const int key0 = static_cast<int>(word % p.words_per_row) * 32;
  const bool* row = p.mask + b * p.mask_batch_stride;
  uint32_t bits = 0;
  for (int i = 0; i < 32 && key0 + i < p.seqlen_k; ++i) {
    if (ld_global_bool(row + (key0 + i) * p.mask_key_stride)) bits |= 1u << i;
  }
  st_global_u32(p.bits + word, bits);
}

}  // namespace l2vf
