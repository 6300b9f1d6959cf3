// Forward kernel, head dim 128, bf16 (one file per instantiation so they build in parallel).
#include "flash_attn/launch.cuh"

namespace l2vf {
template cudaError_t run_fwd<Bf16, 128>(const FwdParams&, cudaStream_t);
template int smem_bytes_needed<Bf16, 128>();
}  // namespace l2vf
