// The CUDA launcher of the Hopper forward: tensor maps encoded on the host, then one launch.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "../launch.cuh"
#include "api_sm90.h"
#include "configs_sm90.cuh"

namespace l2vf {

template <class Elem, int kHeadDim>
std::string run_fwd_sm90(const FwdParams& p, int64_t kv_tokens, cudaStream_t stream) {
  using Cfg = typename HopperConfigs<Elem, kHeadDim>::Fwd;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  HopperFwdParams hp;
  const std::string problem = make_hopper_fwd_params<Cfg>(p, kv_tokens, sms, hp);
  if (!problem.empty()) return problem;
  err = launch_forward_sm90<Elem, kHeadDim>(hp, CudaLaunch{stream});
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

template <class Elem, int kHeadDim>
int smem_bytes_needed_sm90() {
  return HopperConfigs<Elem, kHeadDim>::Fwd::kSmemBytes;
}

}  // namespace l2vf
