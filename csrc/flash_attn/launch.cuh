// The CUDA launcher: grid, block, dynamic shared memory (raising the 48 KB default where a
// kernel needs more), and error checking.
#pragma once

#include <cuda_runtime_api.h>

#include "api.h"
#include "configs.cuh"

namespace l2vf {

struct CudaLaunch {
  cudaStream_t stream;

  template <class Params>
  cudaError_t operator()(void (*kernel)(Params), dim3 grid, int threads, int smem_bytes, const Params& p) const {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;  // empty tensors: nothing to do
    if (smem_bytes > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
      if (err != cudaSuccess) return err;
    }
    kernel<<<grid, threads, smem_bytes, stream>>>(p);
    return cudaGetLastError();
  }
};

template <class Elem, int kHeadDim>
cudaError_t run_fwd(const FwdParams& p, cudaStream_t stream) {
  return launch_forward<Elem, kHeadDim>(p, CudaLaunch{stream});
}

template <class Elem, int kHeadDim>
cudaError_t run_bwd(const BwdParams& p, cudaStream_t stream) {
  return launch_backward<Elem, kHeadDim>(p, CudaLaunch{stream});
}

template <class Elem, int kHeadDim>
cudaError_t run_bwd_preprocess(const BwdParams& p, cudaStream_t stream) {
  return launch_bwd_preprocess<Elem, kHeadDim>(p, CudaLaunch{stream});
}

template <class Elem, int kHeadDim>
int smem_bytes_needed() {
  return max_smem_bytes<Elem, kHeadDim>();
}

}  // namespace l2vf
