// Forward kernel, head dim 64, bf16 (one file per instantiation so they build in parallel).
#include "flash_attn/launch.cuh"

namespace l2vf {
template cudaError_t run_fwd<Bf16, 64>(const FwdParams&, cudaStream_t);
template int smem_bytes_needed<Bf16, 64>();
}  // namespace l2vf
