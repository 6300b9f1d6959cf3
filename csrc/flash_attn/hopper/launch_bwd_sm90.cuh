// The CUDA launcher of the Hopper backward: tensor maps encoded on the host, then the preprocess
// (run_bwd_preprocess of the sm80 objects) and the dK/dV kernel (adding dQ with atomics), or on the
// deterministic path the dK/dV kernel and the dQ kernel; every one a persistent grid of one block per SM.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "../launch.cuh"
#include "api_sm90.h"
#include "configs_bwd_sm90.cuh"

namespace l2vf {

template <class Elem, int kHeadDim>
std::string run_bwd_sm90(const BwdParams& p, int64_t kv_tokens, cudaStream_t stream) {
  int device = 0, sms = 0;  // one block per SM: the persistent grids' size
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  HopperBwdLaunchParams lp;
  const std::string problem = make_hopper_bwd_launch_params<Elem, kHeadDim>(p, kv_tokens, sms, lp);
  if (!problem.empty()) return problem;
  err = run_bwd_preprocess<Elem, kHeadDim>(p, stream);  // instantiated in csrc/bwd_*.cu (every arch)
  if (err == cudaSuccess) err = launch_backward_sm90<Elem, kHeadDim>(lp, CudaLaunch{stream});
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

template <class Elem, int kHeadDim>
int bwd_smem_bytes_needed_sm90() {
  return hopper_bwd_smem_bytes<Elem, kHeadDim>();
}

}  // namespace l2vf
