// Host entry points of the Hopper forward and backward (csrc/fwd_sm90_*.cu, bwd_sm90_*.cu, built for sm_90a
// only), called by the torch binding on compute capability 9.x devices. Free of torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "../elements.h"
#include "../params.h"

namespace l2vf {

// out and lse, as run_fwd computes them; kv_tokens is the length of k/v's token dimension
// (seqlen_k padded, total keys varlen), the extent of their tensor maps. Runs on `stream`;
// returns "" or a one-line reason (a tensor map the driver refused, a CUDA error).
template <class Elem, int kHeadDim>
std::string run_fwd_sm90(const FwdParams& p, int64_t kv_tokens, cudaStream_t stream);

// The dynamic shared memory per block the Hopper forward of this head dim needs.
template <class Elem, int kHeadDim>
int smem_bytes_needed_sm90();

// dq, dk and dv as run_bwd computes them (csrc/bwd_sm90_*.cu): dq added to p.dq_accum with atomics when it is
// set (the caller scales and converts it), else written to p.dq once per element (deterministic); kv_tokens as
// for run_fwd_sm90. "" or a one-line reason.
template <class Elem, int kHeadDim>
std::string run_bwd_sm90(const BwdParams& p, int64_t kv_tokens, cudaStream_t stream);

// The dynamic shared memory per block the Hopper backward of this head dim needs.
template <class Elem, int kHeadDim>
int bwd_smem_bytes_needed_sm90();

}  // namespace l2vf
