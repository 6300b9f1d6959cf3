// Hopper forward kernel, head dim 128, fp16 (sm_90a only: setup.py builds csrc/fwd_sm90_*.cu for that arch alone).
#include "flash_attn/hopper/launch_sm90.cuh"

namespace l2vf {
template std::string run_fwd_sm90<Fp16, 128>(const FwdParams&, int64_t, cudaStream_t);
template int smem_bytes_needed_sm90<Fp16, 128>();
}  // namespace l2vf
