// Backward kernels (preprocess, dK/dV, dQ), head dim 64, fp16.
#include "flash_attn/launch.cuh"

namespace l2vf {
template cudaError_t run_bwd<Fp16, 64>(const BwdParams&, cudaStream_t);
template cudaError_t run_bwd_preprocess<Fp16, 64>(const BwdParams&, cudaStream_t);
}  // namespace l2vf
