// Host entry points of the kernels, called by the torch binding. Free of torch headers.
//
// Each runs on `stream` and returns the first CUDA error (cudaSuccess when all launched).
// Instantiated for Elem in {Fp16, Bf16} and kHeadDim in {64, 128} (csrc/*.cu).
#pragma once

#include <cuda_runtime_api.h>

#include "elements.h"
#include "params.h"

namespace l2vf {

// out and lse.
template <class Elem, int kHeadDim>
cudaError_t run_fwd(const FwdParams& p, cudaStream_t stream);

// delta and lse_log2, then dk and dv, and dq: added to p.dq_accum with atomics when it is set
// (the caller scales and converts it), else written to p.dq by the deterministic dQ kernel.
template <class Elem, int kHeadDim>
cudaError_t run_bwd(const BwdParams& p, cudaStream_t stream);

// delta and lse_log2 alone: the first launch of run_bwd, and of the Hopper backward (which calls it here
// rather than instantiating the kernel in its sm_90a-only objects, where A100 would find no image of it).
template <class Elem, int kHeadDim>
cudaError_t run_bwd_preprocess(const BwdParams& p, cudaStream_t stream);

// The dynamic shared memory the kernels of this head dim need per block.
template <class Elem, int kHeadDim>
int smem_bytes_needed();

cudaError_t run_pack_key_bits(const MaskParams& p, cudaStream_t stream);

// cudaSuccess when the current device can run this build's kernels (the extension holds machine
// code for its architecture), else the error (cudaErrorInvalidDeviceFunction: rebuild for it).
cudaError_t probe_kernel_image();

}  // namespace l2vf
