// The CUDA launcher of the Hopper backward (atomic dQ path): tensor maps encoded on the host, then the
// preprocess (run_bwd_preprocess of the sm80 objects) and the dK/dV/dQ kernel.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "../launch.cuh"
#include "api_sm90.h"
#include "configs_bwd_sm90.cuh"

namespace l2vf {

template <class Elem, int kHeadDim>
std::string run_bwd_sm90(const BwdParams& p, int64_t kv_tokens, cudaStream_t stream) {
  using Cfg = typename HopperBwdConfigs<Elem, kHeadDim>::KV;
  HopperBwdParams hp;
  const std::string problem = make_hopper_bwd_params<Cfg>(p, kv_tokens, hp);
  if (!problem.empty()) return problem;
  cudaError_t err = run_bwd_preprocess<Elem, kHeadDim>(p, stream);  // instantiated in csrc/bwd_*.cu (every arch)
  if (err == cudaSuccess) err = launch_backward_sm90<Elem, kHeadDim>(hp, CudaLaunch{stream});
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

template <class Elem, int kHeadDim>
int bwd_smem_bytes_needed_sm90() {
  return HopperBwdConfigs<Elem, kHeadDim>::KV::kSmemBytes;
}

}  // namespace l2vf
