// Hopper backward kernels (dK/dV adding dQ with atomics; dK/dV and dQ, deterministic), head dim 64, fp16.
// sm_90a only: setup.py builds csrc/bwd_sm90_*.cu for that arch alone.
#include "flash_attn/hopper/launch_bwd_sm90.cuh"

namespace l2vf {
// Its preprocess comes from csrc/bwd_d64_*.cu, built for every arch (not instantiated here for sm_90a alone).
extern template cudaError_t run_bwd_preprocess<Fp16, 64>(const BwdParams&, cudaStream_t);
template std::string run_bwd_sm90<Fp16, 64>(const BwdParams&, int64_t, cudaStream_t);
template int bwd_smem_bytes_needed_sm90<Fp16, 64>();
}  // namespace l2vf
