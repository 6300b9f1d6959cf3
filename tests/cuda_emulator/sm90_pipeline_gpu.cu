// The test pipeline of sm90_pipeline.cuh on a real sm_90 GPU, with the same C entry point as the
// emulator's (selftest_sm90.cpp), so tests/test_cuda_emulator_sm90.py (marked gpu) can check the
// hardware against the same float64 reference: the proof that the descriptor layouts, swizzles
// and fragment mappings the emulator assumes are the hardware's. Only the correct pipeline runs
// here (planted bugs hang or corrupt on a GPU). Built with nvcc -shared, no -lcuda.
#include <cuda_runtime.h>

#include <string>

#include "flash_attn/ptx.cuh"
#include "flash_attn/ptx_sm90.cuh"
#include "sm90_pipeline.cuh"

namespace {

std::string g_error;

// Records the first failing call; true when `status` is success.
bool ok(cudaError_t status, const char* what) {
  if (status != cudaSuccess && g_error.empty()) g_error = std::string(what) + ": " + cudaGetErrorString(status);
  return status == cudaSuccess;
}

template <class Elem>
bool launch(const l2vf_test::PipelineParams& p) {
  auto* kernel = &l2vf_test::sm90_pipeline_kernel<Elem>;
  const int smem = static_cast<int>(l2vf_test::kSmemBytes);
  if (!ok(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "cudaFuncSetAttribute")) {
    return false;
  }
  kernel<<<1, l2vf_test::kThreads, smem>>>(p);
  return ok(cudaGetLastError(), "launch") && ok(cudaDeviceSynchronize(), "kernel");
}

}  // namespace

extern "C" {

// As emu_sm90_pipeline (host tensors in and out); bug must be 0.
const char* gpu_sm90_pipeline(int elem, int bug, int span, int keys, int heads, int head, const uint16_t* q,
                              const uint16_t* k, const uint16_t* v, float* o, float* probe) {
  using namespace l2vf_test;
  g_error.clear();
  if (bug != 0) return "planted bugs run only on the emulator";
  const size_t q_bytes = kRows * kDim * 2, kv_bytes = static_cast<size_t>(keys) * heads * kDim * 2;
  const size_t o_bytes = kRows * kDim * 4, probe_bytes = 256 * 4;
  void *dq = nullptr, *dk = nullptr, *dv = nullptr, *dout = nullptr, *dprobe = nullptr;
  if (ok(cudaMalloc(&dq, q_bytes), "cudaMalloc") && ok(cudaMalloc(&dk, kv_bytes), "cudaMalloc") &&
      ok(cudaMalloc(&dv, kv_bytes), "cudaMalloc") && ok(cudaMalloc(&dout, o_bytes), "cudaMalloc") &&
      ok(cudaMalloc(&dprobe, probe_bytes), "cudaMalloc") &&
      ok(cudaMemcpy(dq, q, q_bytes, cudaMemcpyHostToDevice), "copy q") &&
      ok(cudaMemcpy(dk, k, kv_bytes, cudaMemcpyHostToDevice), "copy k") &&
      ok(cudaMemcpy(dv, v, kv_bytes, cudaMemcpyHostToDevice), "copy v") &&
      ok(cudaMemset(dout, 0xff, o_bytes), "poison o") && ok(cudaMemset(dprobe, 0xff, probe_bytes), "poison probe")) {
    PipelineParams p{};
    g_error = make_pipeline_params(p, 0, span, keys, heads, head, dq, dk, dv, static_cast<float*>(dout),
                                   static_cast<float*>(dprobe));
    if (g_error.empty() && (elem == 0 ? launch<l2vf::Fp16>(p) : launch<l2vf::Bf16>(p))) {
      ok(cudaMemcpy(o, dout, o_bytes, cudaMemcpyDeviceToHost), "copy o");
      ok(cudaMemcpy(probe, dprobe, probe_bytes, cudaMemcpyDeviceToHost), "copy probe");
    }
  }
  for (void* ptr : {dq, dk, dv, dout, dprobe}) cudaFree(ptr);
  return g_error.c_str();
}

}  // extern "C"
