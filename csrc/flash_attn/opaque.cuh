// A compiler fence the sm80 and Hopper kernels share: not an instruction of its own, so it lives outside
// ptx.cuh (which the CPU emulator replaces) and ptx_sm90.cuh.
#pragma once

#include <cstdint>

namespace l2vf {

// x, opaque to the compiler: values derived from it are recomputed where they are used instead of
// being hoisted out of a loop and kept in registers across it. A `mov` in device code; the identity
// on the host, so the CPU emulator (which compiles the kernels as host C++) needs nothing for it.
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
#if defined(__CUDA_ARCH__)
  asm volatile("mov.b32 %0, %1;\n" : "=r"(x) : "r"(x));
#endif
  return x;
}

}  // namespace l2vf
