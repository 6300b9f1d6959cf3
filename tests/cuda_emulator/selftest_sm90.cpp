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

}  // extern "C"
