// Hopper forward kernel, head dim 64, bf16 (sm_90a only: setup.py builds csrc/fwd_sm90_*.cu for that arch alone).
#include "flash_attn/hopper/launch_sm90.cuh"

namespace l2vf {
template std::string run_fwd_sm90<Bf16, 64>(const FwdParams&, int64_t, cudaStream_t);
template int smem_bytes_needed_sm90<Bf16, 64>();
}  // namespace l2vf
