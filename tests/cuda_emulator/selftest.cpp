// Checks of the emulator itself: small kernels with one deliberate bug each, which the emulator
// must report, and a kernel that multiplies tiles through every fragment helper of tile.cuh,
// which must match a matrix product (tests/test_cuda_emulated.py compares them).
#include "emulator.h"  // first: replaces csrc/flash_attn/ptx.cuh

#include <string>

#include "flash_attn/tile.cuh"

namespace {

using l2vf::SmemTile;

// 128 threads, 4 warps; shared memory: a 64 x 64 tile of 16-bit elements.
constexpr int kThreads = 128;
using Tile = SmemTile<64, 64>;

struct BugParams {
  int bug;
  const uint16_t* in;  // 64 x 64
  float* out;          // 128 floats
};

void buggy_kernel(const BugParams p) {
  const uint32_t s = l2vf::dynamic_smem();
  const int t = static_cast<int>(threadIdx.x);
  switch (p.bug) {
    case 0: {  // correct: copy, wait, barrier, read another thread's chunk
      l2vf::copy_tile_async<Tile, kThreads>(s, p.in, 64, 64);
      l2vf::cp_async_commit();
      l2vf::cp_async_wait<0>();
      __syncthreads();
      const uint4 v = l2vf::ld_shared_16(s + Tile::offset((t + 7) % 64, t % 8));
      l2vf::st_global_f32(p.out + t, static_cast<float>(v.x & 0xff));
      break;
    }
    case 1: {  // read another thread's copy without the barrier (row t/8 + 1 is thread t+8's)
      l2vf::copy_tile_async<Tile, kThreads>(s, p.in, 64, 64);
      l2vf::cp_async_commit();
      l2vf::cp_async_wait<0>();
      l2vf::ld_shared_16(s + Tile::offset(t / 8 + 1, t % 8));
      break;
    }
    case 2: {  // read before waiting for the copy
      l2vf::copy_tile_async<Tile, kThreads>(s, p.in, 64, 64);
      l2vf::cp_async_commit();
      __syncthreads();
      l2vf::ld_shared_16(s + Tile::offset(t % 64, t % 8));
      l2vf::cp_async_wait<0>();
      break;
    }
    case 3: {  // waits for too few groups: the second group is still in flight
      l2vf::copy_tile_async<SmemTile<32, 64>, kThreads>(s, p.in, 64, 32);
      l2vf::cp_async_commit();
      l2vf::copy_tile_async<SmemTile<32, 64>, kThreads>(s + SmemTile<32, 64>::kBytes, p.in + 32 * 64, 64, 32);
      l2vf::cp_async_commit();
      l2vf::cp_async_wait<1>();
      __syncthreads();
      l2vf::ld_shared_16(s + Tile::offset(32 + t % 32, t % 8));
      l2vf::cp_async_wait<0>();
      break;
    }
    case 4: {  // overwrite a word another warp reads, no barrier in between
      l2vf::st_shared_u32(s + 4 * t, 1u);
      __syncthreads();
      if (t < 32) {
        l2vf::ld_shared_16(s + 16 * (t % 8));
      } else if (t >= 64 && t < 96) {
        l2vf::st_shared_u32(s + 4 * (t - 64), 2u);
      }
      break;
    }
    case 5: {  // lanes exchange through shared memory with a shuffle (no memory order) in between
      l2vf::st_shared_u32(s + 4 * t, static_cast<uint32_t>(t));
      l2vf::warp_shfl_xor(1.f, 1);
      l2vf::ld_shared_16(s + 16 * ((t / 4) ^ 1));
      break;
    }
    case 6: {  // a barrier only some threads reach
      if (t < 64) __syncthreads();
      break;
    }
    case 7: {  // global read past the input
      l2vf::ld_global_16(p.in + 64 * 64 + 8 * t);
      break;
    }
    case 8: {  // two threads store one output element
      l2vf::st_global_f32(p.out + t / 2, 1.f);
      break;
    }
    case 9: {  // shared memory access past the allocation
      l2vf::st_shared_u32(s + Tile::kBytes + 4 * t, 0u);
      break;
    }
    case 10: {  // a thread exits with a copy in flight
      l2vf::copy_tile_async<Tile, kThreads>(s, p.in, 64, 64);
      l2vf::cp_async_commit();
      break;
    }
    case 11: {  // lanes meet at different collectives
      uint32_t r[4];
      if (t % 2 == 0) {
        l2vf::ldmatrix_x4(r, s);
      } else {
        l2vf::ldmatrix_x4_trans(r, s);
      }
      break;
    }
    case 12: {  // correct: the same exchange with __syncwarp
      l2vf::st_shared_u32(s + 4 * t, static_cast<uint32_t>(t));
      __syncwarp();
      const uint4 v = l2vf::ld_shared_16(s + 16 * ((t / 4) ^ 1));
      l2vf::st_global_f32(p.out + t, static_cast<float>(v.x));
      break;
    }
    default:
      break;
  }
}

// D (16 x 16, float) = A (16 x 32) B (32 x 16) through one of the four operand forms. Inputs as
// 64 x 64 tiles: rows/cols beyond the operand are unused.
struct FragParams {
  const uint16_t* a;  // form 0, 2: [m][k] 64 x 64; form 1, 3: [k][m]
  const uint16_t* b;  // form 0, 1: [n][k];          form 2, 3: [k][n]
  int form;           // bit 0: A stored transposed; bit 1: B stored [k][n]
  int elem;           // 0 fp16, 1 bf16
  float* d;           // 16 x 16 row-major
};

template <class Elem>
void fragment_kernel(const FragParams p) {
  const uint32_t sa = l2vf::dynamic_smem(), sb = sa + Tile::kBytes;
  l2vf::copy_tile_async<Tile, kThreads>(sa, p.a, 64, 64);
  l2vf::copy_tile_async<Tile, kThreads>(sb, p.b, 64, 64);
  l2vf::cp_async_commit();
  l2vf::cp_async_wait<0>();
  __syncthreads();
  if (threadIdx.x >= 32) return;  // one warp computes
  const bool a_trans = p.form & 1, b_kn = p.form & 2;
  // Operands at an offset inside the tiles (rows 16.., chunk 2..) to exercise the swizzle.
  const int r0 = 16, c0 = 2;
  float acc[2][4] = {};
  for (int kk = 0; kk < 2; ++kk) {
    uint32_t a[4], b[4];
    if (a_trans) {
      l2vf::load_a_trans(a, l2vf::a_operand_trans<Tile>(sa), r0 + 16 * kk, c0);
    } else {
      l2vf::load_a(a, l2vf::a_operand<Tile>(sa), r0, c0 + 2 * kk);
    }
    if (b_kn) {
      l2vf::load_b_pair_trans(b, l2vf::b_operand_trans<Tile>(sb), r0 + 16 * kk, c0);
    } else {
      l2vf::load_b_pair(b, l2vf::b_operand<Tile>(sb), r0, c0 + 2 * kk);
    }
    l2vf::mma_16816<Elem>(acc[0], a, b[0], b[1]);
    l2vf::mma_16816<Elem>(acc[1], a, b[2], b[3]);
  }
  const int lane = static_cast<int>(threadIdx.x), g = lane / 4, q = lane % 4;
  for (int nt = 0; nt < 2; ++nt) {
    for (int e = 0; e < 4; ++e) {
      l2vf::st_global_f32(p.d + (g + 8 * (e / 2)) * 16 + nt * 8 + 2 * q + (e % 2), acc[nt][e]);
    }
  }
}

std::string g_selftest_error;

}  // namespace

extern "C" {

// Runs buggy kernel `bug`; returns the emulator's report ("" = none).
const char* emu_selftest_bug(int bug, const uint16_t* in, float* out) {
  const BugParams p{bug, in, out};
  g_selftest_error = emu::emulator().run(dim3(1), kThreads, Tile::kBytes, [&] { buggy_kernel(p); });
  return g_selftest_error.c_str();
}

const char* emu_selftest_fragments(int form, int elem, const uint16_t* a, const uint16_t* b, float* d) {
  const FragParams p{a, b, form, elem, d};
  g_selftest_error = emu::emulator().run(dim3(1), kThreads, 2 * Tile::kBytes, [&] {
    if (elem == 0) {
      fragment_kernel<l2vf::Fp16>(p);
    } else {
      fragment_kernel<l2vf::Bf16>(p);
    }
  });
  return g_selftest_error.c_str();
}

}  // extern "C"
