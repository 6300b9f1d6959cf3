// Every architecture-specific instruction the attention kernels use, behind small functions.
//
// Kernels reach tensor cores, asynchronous copies, shared/global memory and the special
// function unit only through this header, so that the kernel code reads as plain C++ over
// fragments. Requires sm_80 or newer (cp.async, bf16 mma, cvt to f16x2/bf16x2).
//
// Fragment layouts of mma.sync.m16n8k16 (g = lane / 4, q = lane % 4), each register holding
// two 16-bit elements, lower column in the lower half:
//   A (16x16, row-major)  a[0]: (row g,   cols 2q..2q+1)   a[1]: (row g+8, cols 2q..2q+1)
//                         a[2]: (row g,   cols 8+2q..)     a[3]: (row g+8, cols 8+2q..)
//   B (16x8, "col")       b[0]: (rows k = 2q..2q+1, col g) b[1]: (rows k = 8+2q.., col g)
//   C/D (16x8, float)     c[0], c[1]: (row g, cols 2q, 2q+1)   c[2], c[3]: (row g+8, cols 2q, 2q+1)
// ldmatrix.x4: lane l gives the address of row l % 8 of matrix l / 8; register i receives
// matrix i's (row g, cols 2q..2q+1), or with .trans its (rows 2q..2q+1, col g).
#ifndef LLM2VEC_FAST_PTX_CUH
#define LLM2VEC_FAST_PTX_CUH

#include <cstdint>

#include "elements.h"

namespace l2vf {

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// The shared-window address of the block's dynamic shared memory, 128-byte aligned (the tile
// addressing in tile.cuh relies on it).
__device__ __forceinline__ uint32_t dynamic_smem() {
  extern __shared__ __align__(128) char l2vf_dynamic_smem[];
  return smem_u32(l2vf_dynamic_smem);
}

// ---- tensor cores --------------------------------------------------------------------------

// Shared-memory operands below are 32-bit shared-window addresses (smem_u32).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_row));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_row));
}

// d += a @ b with float32 accumulation.
template <class Elem>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<Fp16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<Bf16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---- conversions -----------------------------------------------------------------------------

// Two floats rounded to nearest-even and packed: lo in bits 0-15, hi in bits 16-31.
template <class Elem>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack_pair<Fp16>(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

template <>
__device__ __forceinline__ uint32_t pack_pair<Bf16>(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// The inverse of pack_pair: (lo, hi) as floats.
template <class Elem>
__device__ __forceinline__ float2 unpack_pair(uint32_t bits);

template <>
__device__ __forceinline__ float2 unpack_pair<Fp16>(uint32_t bits) {
  const unsigned short lo = static_cast<unsigned short>(bits & 0xffffu);
  const unsigned short hi = static_cast<unsigned short>(bits >> 16);
  float2 r;
  asm("cvt.f32.f16 %0, %1;\n" : "=f"(r.x) : "h"(lo));
  asm("cvt.f32.f16 %0, %1;\n" : "=f"(r.y) : "h"(hi));
  return r;
}

template <>
__device__ __forceinline__ float2 unpack_pair<Bf16>(uint32_t bits) {
  return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xffff0000u));
}

// ---- special functions -------------------------------------------------------------------------

// 2^x on the special function unit (relative error ~2^-22); 2^-inf = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// tanh(x) = sign(x) (1 - 2 / (2^(2|x| log2 e) + 1)): absolute error ~1e-7, unlike tanh.approx (~5e-4).
__device__ __forceinline__ float accurate_tanh(float x) {
  const float e = fast_exp2(2.f * 1.4426950408889634f * fabsf(x));
  return copysignf(1.f - __fdividef(2.f, e + 1.f), x);
}

__device__ __forceinline__ float warp_shfl_xor(float v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

// ---- asynchronous copies (global -> shared) --------------------------------------------------

// Copies 16 bytes, or writes 16 zero bytes when !pred (gmem is then not read, but must still be
// a valid address). Both addresses 16-byte aligned. Bypasses L1.
__device__ __forceinline__ void cp_async_16(uint32_t smem, const void* gmem, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(pred ? 16 : 0));
}

// Copies 4 bytes, or writes 4 zero bytes when !pred. Both addresses 4-byte aligned.
__device__ __forceinline__ void cp_async_4(uint32_t smem, const void* gmem, bool pred) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem), "l"(gmem), "r"(pred ? 4 : 0));
}

// Closes the group of copies issued since the last commit (an empty group is fine).
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `kPending` of this thread's committed groups are still in flight. Other
// threads' copies become visible only after a barrier that follows every thread's wait.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---- plain memory accesses ---------------------------------------------------------------------

__device__ __forceinline__ uint4 ld_global_16(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void st_global_16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }
__device__ __forceinline__ float ld_global_f32(const float* p) { return *p; }
__device__ __forceinline__ void st_global_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ int ld_global_i32(const int* p) { return *p; }
__device__ __forceinline__ uint32_t ld_global_u32(const uint32_t* p) { return *p; }
__device__ __forceinline__ void st_global_u32(uint32_t* p, uint32_t v) { *p = v; }
__device__ __forceinline__ bool ld_global_bool(const bool* p) { return *p; }

// The result is unused, so this compiles to a fire-and-forget RED instruction.
__device__ __forceinline__ void atomic_add_f32(float* p, float v) { atomicAdd(p, v); }

// Shared-memory accesses are volatile asm like ldmatrix and cp.async, so the compiler keeps
// them in program order relative to those and to barriers.
__device__ __forceinline__ void st_shared_u32(uint32_t p, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(p), "r"(v));
}

__device__ __forceinline__ uint4 ld_shared_16(uint32_t p) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(p));
  return v;
}

__device__ __forceinline__ float2 ld_shared_f32x2(uint32_t p) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(p));
  return v;
}

}  // namespace l2vf

#endif  // LLM2VEC_FAST_PTX_CUH
