// Checks of the Hopper emulator (emulator_sm90.h): the test pipeline of sm90_pipeline.cuh run
// correct (its output compared with a float64 reference by tests/test_cuda_emulator_sm90.py) and
// with each planted bug, which the emulator must report; and a bare TMA load whose shared-memory
// image (swizzle, element strides, out-of-bounds fill) the test compares byte for byte.
#include <string>

#include "emulator.h"  // first: replaces csrc/flash_attn/ptx.cuh
#include "emulator_sm90.h"
#include "sm90_pipeline.cuh"

namespace {

std::string g_error;

void register_buffer(const void* data, size_t bytes, const char* name, bool writable) {
  emu::Buffer b;
  b.base = static_cast<const char*>(data);
  b.bytes = bytes;
  b.name = name;
  b.writable = writable;
  b.stored.assign((bytes + 3) / 4, 0);
  emu::emulator().buffers.push_back(std::move(b));
}

// A 128-thread kernel: thread 0 loads one box through TMA, every thread waits for the barrier and
// copies the shared-memory image to `image` 16 bytes at a time.
struct TmaImageParams {
  l2vf::TmaDescriptor map;
  int c0, c1;
  uint32_t bytes;
  uint8_t* image;
};

void tma_image_kernel(const TmaImageParams& p) {
  const uint32_t s = l2vf::dynamic_smem(), bar = s + 16384;
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) {
    l2vf::mbarrier_init(bar, 1);
    l2vf::mbarrier_init_fence();
  }
  __syncthreads();
  if (t == 0) {
    l2vf::mbarrier_arrive_expect_tx(bar, p.bytes);
    l2vf::tma_load_2d(s, p.map, bar, p.c0, p.c1);
  }
  l2vf::mbarrier_wait(bar, 0);
  for (uint32_t off = 16 * t; off < p.bytes; off += 16 * 128)
    l2vf::st_global_16(p.image + off, l2vf::ld_shared_16(s + off));
}

// One warpgroup computes D (64 x N) = A (64 x 64) · Bᵀ with B (N x 64): four k-steps of SS wgmma,
// each operand K-major ([row][k]) or MN-major ([k][row]) in global memory, loaded by TMA as
// span-wide column blocks and described accordingly.
struct GemmParams {
  l2vf::TmaDescriptor a, b;
  int a_mn_major, b_mn_major, span;
  float* d;
};

constexpr uint32_t kGemmA = 0, kGemmB = 8192, kGemmBar = kGemmB + 256 * 64 * 2;

// The descriptor of k-step kk of a `rows` x 64 operand stored as TMA left it.
uint64_t operand_desc(uint32_t tile, int rows, bool mn_major, int kk, int span) {
  const l2vf::Swizzle swz = l2vf_test::swizzle_of(span);
  if (!mn_major) return l2vf_test::k_major_desc(tile, rows, 0, kk, span, swz);
  return l2vf::make_smem_desc(tile + 16 * kk * span, swz, 64 * span, 8 * span);  // blocks of 64 k rows
}

// Loads a `rows` x 64 operand: K-major as boxes (span / 2 k, rows), MN-major as (span / 2 rows, 64 k).
void load_operand(uint32_t tile, const l2vf::TmaDescriptor& map, uint32_t bar, int rows, bool mn_major, int span) {
  const int cols = span / 2, blocks = (mn_major ? rows : 64) / cols;
  for (int b = 0; b < blocks; ++b) l2vf::tma_load_2d(tile + b * (mn_major ? 64 : rows) * span, map, bar, b * cols, 0);
}

template <class Elem, int N>
void gemm_kernel(const GemmParams& p) {
  const uint32_t s = l2vf::dynamic_smem(), bar = s + kGemmBar;
  const int t = static_cast<int>(threadIdx.x);
  if (t == 0) {
    l2vf::mbarrier_init(bar, 1);
    l2vf::mbarrier_init_fence();
  }
  __syncthreads();
  if (t == 0) {
    l2vf::mbarrier_arrive_expect_tx(bar, (64 + N) * 64 * 2);
    load_operand(s + kGemmA, p.a, bar, 64, p.a_mn_major, p.span);
    load_operand(s + kGemmB, p.b, bar, N, p.b_mn_major, p.span);
  }
  l2vf::mbarrier_wait(bar, 0);
  float d[N / 2];
  l2vf::wgmma_fence();
  for (int kk = 0; kk < 4; ++kk) {
    const uint64_t da = operand_desc(s + kGemmA, 64, p.a_mn_major, kk, p.span);
    const uint64_t db = operand_desc(s + kGemmB, N, p.b_mn_major, kk, p.span);
    if (p.a_mn_major && p.b_mn_major) {
      l2vf::wgmma_ss<Elem, N, l2vf::Major::kMN, l2vf::Major::kMN>(d, da, db, kk > 0);
    } else if (p.a_mn_major) {
      l2vf::wgmma_ss<Elem, N, l2vf::Major::kMN, l2vf::Major::kK>(d, da, db, kk > 0);
    } else if (p.b_mn_major) {
      l2vf::wgmma_ss<Elem, N, l2vf::Major::kK, l2vf::Major::kMN>(d, da, db, kk > 0);
    } else {
      l2vf::wgmma_ss<Elem, N, l2vf::Major::kK, l2vf::Major::kK>(d, da, db, kk > 0);
    }
  }
  l2vf::wgmma_commit();
  l2vf::wgmma_wait<0>();
  const int warp = t / 32, g = (t % 32) / 4, q = t % 4;
  for (int j = 0; j < N / 8; ++j) {
    for (int v = 0; v < 4; ++v) {
      const int row = 16 * warp + g + 8 * (v / 2), col = 8 * j + 2 * q + v % 2;
      l2vf::st_global_f32(p.d + row * N + col, d[4 * j + v]);
    }
  }
}

}  // namespace

extern "C" {

// Runs the pipeline: q (128, 64), k and v (keys, heads, 64) of 16-bit elements; o (128, 64) and
// probe (256) floats. Returns the emulator's report ("" = none).
const char* emu_sm90_pipeline(int elem, int bug, int span, int keys, int heads, int head, const uint16_t* q,
                              const uint16_t* k, const uint16_t* v, float* o, float* probe) {
  using namespace l2vf_test;
  emu::emulator().buffers.clear();
  register_buffer(q, kRows * kDim * 2, "q", false);
  register_buffer(k, static_cast<size_t>(keys) * heads * kDim * 2, "k", false);
  register_buffer(v, static_cast<size_t>(keys) * heads * kDim * 2, "v", false);
  register_buffer(o, kRows * kDim * 4, "o", true);
  register_buffer(probe, 256 * 4, "probe", true);
  PipelineParams p{};
  g_error = make_pipeline_params(p, bug, span, keys, heads, head, q, k, v, o, probe);
  if (!g_error.empty()) return g_error.c_str();
  g_error = emu::run_sm90(dim3(1), kThreads, static_cast<int>(kSmemBytes), [&] {
    if (elem == 0) {
      sm90_pipeline_kernel<l2vf::Fp16>(p);
    } else {
      sm90_pipeline_kernel<l2vf::Bf16>(p);
    }
  });
  return g_error.c_str();
}

// Loads the box (box0, box1) at (c0, c1) of a (rows, cols) 16-bit tensor with the given swizzle
// span (0 = none) and element stride along rows; writes the shared-memory image to `image`.
const char* emu_sm90_tma_image(int span, int box0, int box1, int elem_stride1, int c0, int c1, int rows, int cols,
                               const uint16_t* src, uint8_t* image) {
  emu::emulator().buffers.clear();
  register_buffer(src, static_cast<size_t>(rows) * cols * 2, "src", false);
  l2vf::TmaTensorSpec s = l2vf_test::dense_spec(src, 2, {uint64_t(cols), uint64_t(rows)},
                                                {uint32_t(box0), uint32_t(box1)}, static_cast<l2vf::Swizzle>(span));
  s.elem_strides[1] = static_cast<uint32_t>(elem_stride1);
  TmaImageParams p{};
  g_error = l2vf::encode_tma_descriptor(s, &p.map);
  if (!g_error.empty()) return g_error.c_str();
  p.c0 = c0;
  p.c1 = c1;
  p.bytes = l2vf::tma_box_bytes(s);
  p.image = image;
  register_buffer(image, p.bytes, "image", true);
  g_error = emu::run_sm90(dim3(1), 128, 16384 + 8, [&] { tma_image_kernel(p); });
  return g_error.c_str();
}

// D (64 x n) = A Bᵀ through SS wgmma: a is (64, 64) K-major or (64 k, 64 m) MN-major, b (n, 64) or
// (64 k, n); d (64, n) floats; n 64, 128 or 192.
const char* emu_sm90_gemm(int elem, int n, int a_mn_major, int b_mn_major, int span, const uint16_t* a,
                          const uint16_t* b, float* d) {
  emu::emulator().buffers.clear();
  register_buffer(a, 64 * 64 * 2, "a", false);
  register_buffer(b, static_cast<size_t>(n) * 64 * 2, "b", false);
  register_buffer(d, static_cast<size_t>(n) * 64 * 4, "d", true);
  const l2vf::Swizzle swz = l2vf_test::swizzle_of(span);
  const uint32_t cols = static_cast<uint32_t>(span / 2), rows = static_cast<uint32_t>(n);
  GemmParams p{};
  // Inner dimension first: K-major (k, rows) with boxes (span / 2, rows); MN-major (rows, k), boxes (span / 2, 64).
  // A is square: both of its forms are a (64, 64) view with (span / 2, 64) boxes.
  g_error = l2vf::encode_tma_descriptor(l2vf_test::dense_spec(a, 2, {64, 64}, {cols, 64}, swz), &p.a);
  if (g_error.empty()) {
    g_error = l2vf::encode_tma_descriptor(b_mn_major ? l2vf_test::dense_spec(b, 2, {rows, 64}, {cols, 64}, swz)
                                                     : l2vf_test::dense_spec(b, 2, {64, rows}, {cols, rows}, swz),
                                          &p.b);
  }
  if (!g_error.empty()) return g_error.c_str();
  p.a_mn_major = a_mn_major;
  p.b_mn_major = b_mn_major;
  p.span = span;
  p.d = d;
  const auto run = [&](auto kernel) { g_error = emu::run_sm90(dim3(1), 128, kGemmBar + 8, [&] { kernel(p); }); };
  const bool fp16 = elem == 0;
  if (n == 64) {
    run(fp16 ? gemm_kernel<l2vf::Fp16, 64> : gemm_kernel<l2vf::Bf16, 64>);
  } else if (n == 128) {
    run(fp16 ? gemm_kernel<l2vf::Fp16, 128> : gemm_kernel<l2vf::Bf16, 128>);
  } else if (n == 192) {
    run(fp16 ? gemm_kernel<l2vf::Fp16, 192> : gemm_kernel<l2vf::Bf16, 192>);
  } else {
    g_error = "emu_sm90_gemm: n must be 64, 128 or 192";
  }
  return g_error.c_str();
}

}  // extern "C"
