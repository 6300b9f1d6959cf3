// sm_90a build of the test pipeline (sm90_pipeline.cuh) for tests/test_cuda_compile.py: its SASS
// must show HGMMA, UTMALDG, UTMASTG and SYNCS, and ptxas no spills.
#include "flash_attn/ptx.cuh"
#include "flash_attn/ptx_sm90.cuh"
#include "sm90_pipeline.cuh"

template __global__ void l2vf_test::sm90_pipeline_kernel<l2vf::Fp16>(const __grid_constant__ l2vf_test::PipelineParams);
template __global__ void l2vf_test::sm90_pipeline_kernel<l2vf::Bf16>(const __grid_constant__ l2vf_test::PipelineParams);
