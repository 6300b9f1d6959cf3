// Backward kernels (preprocess, dK/dV, dQ), head dim 64, bf16.
#include "flash_attn/launch.cuh"

namespace l2vf {
template cudaError_t run_bwd<Bf16, 64>(const BwdParams&, cudaStream_t);
template cudaError_t run_bwd_preprocess<Bf16, 64>(const BwdParams&, cudaStream_t);
}  // namespace l2vf
