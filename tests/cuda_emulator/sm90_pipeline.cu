// sm_90a build of the test pipeline (sm90_pipeline.cuh) for tests/test_cuda_compile.py: its SASS
// must show HGMMA, UTMALDG, UTMASTG and SYNCS, and ptxas no spills. A second kernel issues each
// wgmma shape of ptx_sm90.cuh once, in both forms, so that every specialisation assembles.
#include "flash_attn/ptx.cuh"
#include "flash_attn/ptx_sm90.cuh"
#include "sm90_pipeline.cuh"

template __global__ void l2vf_test::sm90_pipeline_kernel<l2vf::Fp16>(const __grid_constant__ l2vf_test::PipelineParams);
template __global__ void l2vf_test::sm90_pipeline_kernel<l2vf::Bf16>(const __grid_constant__ l2vf_test::PipelineParams);

namespace l2vf_test {

// One warpgroup: d = A Bᵀ (SS), then d += A' Bᵀ (RS, B N-major), stored; operands wherever.
template <class Elem, int N>
__global__ void __launch_bounds__(128, 1) wgmma_shape_kernel(uint64_t desc_a, uint64_t desc_b, float* out) {
  float d[N / 2] = {};
  const uint32_t a[4] = {threadIdx.x, 2 * threadIdx.x, 3 * threadIdx.x, 4 * threadIdx.x};
  l2vf::wgmma_fence();
  l2vf::wgmma_ss<Elem, N, Major::kK, Major::kK>(d, desc_a, desc_b, false);
  l2vf::wgmma_rs<Elem, N, Major::kMN>(d, a, desc_b, true);
  l2vf::wgmma_commit();
  l2vf::wgmma_wait<0>();
  l2vf::wgmma_fence_operands(d);
  for (int i = 0; i < N / 2; ++i) out[threadIdx.x * (N / 2) + i] = d[i];
}

#define L2VF_SHAPES(N)                                                                    \
  template __global__ void wgmma_shape_kernel<l2vf::Fp16, N>(uint64_t, uint64_t, float*); \
  template __global__ void wgmma_shape_kernel<l2vf::Bf16, N>(uint64_t, uint64_t, float*);
L2VF_SHAPES(64)
L2VF_SHAPES(96)
L2VF_SHAPES(128)
L2VF_SHAPES(176)
L2VF_SHAPES(192)
L2VF_SHAPES(256)
#undef L2VF_SHAPES

}  // namespace l2vf_test
