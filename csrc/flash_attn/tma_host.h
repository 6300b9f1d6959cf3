// Host side of the Hopper tensor memory accelerator (TMA): the descriptor type the kernels take
// and a checked encoder for tiled tensor maps.
//
// A TmaDescriptor is a CUtensorMap (128 bytes; 128-byte aligned as CUDA 13's cuda.h declares it,
// which meets the 64 bytes the TMA instructions need): the binding encodes one per
// operand on the host and passes it by value as a `const __grid_constant__` kernel parameter (or a
// member of one), so that the device reads it from parameter space; ptx_sm90.cuh's TMA
// instructions take its generic address. The encoder reaches cuTensorMapEncodeTiled through the
// runtime's driver entry point, so the extension needs no -lcuda.
//
// The CPU emulator (tests/cuda_emulator/emulator_sm90.h) defines LLM2VEC_FAST_TMA_EMULATED before
// including this header and supplies its own encode_tma_descriptor with the same signature and the
// same checks (check_tma_spec), storing the spec in the descriptor's bytes instead.
#ifndef LLM2VEC_FAST_TMA_HOST_H
#define LLM2VEC_FAST_TMA_HOST_H

#include <cstdint>
#include <string>

namespace l2vf {

// Shared-memory swizzle of a TMA box and of a wgmma operand, by the span in bytes whose 16-byte
// chunks are permuted: chunk c of 128-byte line L of a span-sized row goes to c ^ (L % (span / 16)).
enum class Swizzle : uint8_t { kNone = 0, k32B = 32, k64B = 64, k128B = 128 };

struct alignas(128) TmaDescriptor {
  uint64_t opaque[16];
};
static_assert(sizeof(TmaDescriptor) == 128, "a CUtensorMap is 128 bytes");

constexpr int kTmaMaxRank = 5;

// A tiled view of a global tensor. Dimension 0 is the innermost (contiguous) one; coordinates in
// the device instructions are given in this order too.
struct TmaTensorSpec {
  const void* base = nullptr;          // 16-byte aligned
  int rank = 0;                        // 1..5
  int elem_bytes = 2;                  // 1, 2, 4 or 8
  uint64_t dims[kTmaMaxRank] = {};     // elements per dimension, 1..2^32
  uint64_t strides[kTmaMaxRank] = {};  // bytes between consecutive indices of dim i (i >= 1); [0] unused
  uint32_t box[kTmaMaxRank] = {};      // box extent per dimension in elements, 1..256
  uint32_t elem_strides[kTmaMaxRank] = {1, 1, 1, 1, 1};  // traversal step per dimension, 1..8; [0] ignored
  Swizzle swizzle = Swizzle::kNone;
};

// Elements the box holds along dimension i in shared memory: ceil(box / elem_stride).
inline uint32_t tma_box_extent(const TmaTensorSpec& spec, int i) {
  const uint32_t step = i == 0 ? 1 : spec.elem_strides[i];
  return (spec.box[i] + step - 1) / step;
}

// Bytes one load of this box writes to shared memory (and counts toward its mbarrier's tx),
// out-of-bounds elements included.
inline uint32_t tma_box_bytes(const TmaTensorSpec& spec) {
  uint32_t bytes = static_cast<uint32_t>(spec.elem_bytes);
  for (int i = 0; i < spec.rank; ++i) bytes *= tma_box_extent(spec, i);
  return bytes;
}

// The constraints cuTensorMapEncodeTiled documents, as one message naming the first violated, or "".
inline std::string check_tma_spec(const TmaTensorSpec& spec) {
  if (spec.rank < 1 || spec.rank > kTmaMaxRank) return "TMA tensor rank must be 1..5, got " + std::to_string(spec.rank);
  if (spec.elem_bytes != 1 && spec.elem_bytes != 2 && spec.elem_bytes != 4 && spec.elem_bytes != 8) {
    return "TMA element size must be 1, 2, 4 or 8 bytes, got " + std::to_string(spec.elem_bytes);
  }
  if (reinterpret_cast<uintptr_t>(spec.base) % 16 != 0) return "TMA global address must be 16-byte aligned";
  for (int i = 0; i < spec.rank; ++i) {
    const std::string dim = " of dimension " + std::to_string(i);
    if (spec.dims[i] == 0 || spec.dims[i] > (uint64_t{1} << 32)) return "TMA size" + dim + " must be 1..2^32";
    if (spec.box[i] == 0 || spec.box[i] > 256) return "TMA box extent" + dim + " must be 1..256";
    if (i > 0 && (spec.elem_strides[i] == 0 || spec.elem_strides[i] > 8))
      return "TMA element stride" + dim + " must be 1..8";
    if (i > 0 && (spec.strides[i] % 16 != 0 || spec.strides[i] >= (uint64_t{1} << 40))) {
      return "TMA byte stride" + dim + " must be a multiple of 16 below 2^40";
    }
  }
  const uint32_t inner_bytes = spec.box[0] * static_cast<uint32_t>(spec.elem_bytes);
  if (inner_bytes % 16 != 0)
    return "TMA box inner extent must be a multiple of 16 bytes, got " + std::to_string(inner_bytes);
  const uint32_t span = static_cast<uint32_t>(spec.swizzle);
  if (span != 0 && inner_bytes > span) {
    return "TMA box inner extent (" + std::to_string(inner_bytes) + " bytes) exceeds the " + std::to_string(span) +
           "-byte swizzle span";
  }
  return "";
}

#if !defined(LLM2VEC_FAST_TMA_EMULATED)

}  // namespace l2vf

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

namespace l2vf {

static_assert(sizeof(CUtensorMap) == sizeof(TmaDescriptor) && alignof(CUtensorMap) == alignof(TmaDescriptor),
              "TmaDescriptor must be layout-compatible with CUtensorMap");

inline CUtensorMapSwizzle cu_swizzle(Swizzle s) {
  switch (s) {
    case Swizzle::k32B:
      return CU_TENSOR_MAP_SWIZZLE_32B;
    case Swizzle::k64B:
      return CU_TENSOR_MAP_SWIZZLE_64B;
    case Swizzle::k128B:
      return CU_TENSOR_MAP_SWIZZLE_128B;
    default:
      return CU_TENSOR_MAP_SWIZZLE_NONE;
  }
}

inline CUtensorMapDataType cu_elem_type(int elem_bytes) {
  switch (elem_bytes) {
    case 1:
      return CU_TENSOR_MAP_DATA_TYPE_UINT8;
    case 2:
      return CU_TENSOR_MAP_DATA_TYPE_UINT16;  // fp16 and bf16 move as raw bits; out-of-bounds fill is 0
    case 4:
      return CU_TENSOR_MAP_DATA_TYPE_UINT32;
    default:
      return CU_TENSOR_MAP_DATA_TYPE_UINT64;
  }
}

// The driver's encoder, looked up once (thread-safe static initialisation); null if the driver lacks it.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* entry = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t status =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry, 12000, cudaEnableDefault, &found);
    return status == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(entry)
               : nullptr;
  }();
  return fn;
}

// Encodes `spec` into *out (out-of-bounds elements read as zero, L2 promotion 128 B).
// Returns "" or a one-line reason.
inline std::string encode_tma_descriptor(const TmaTensorSpec& spec, TmaDescriptor* out) {
  const std::string problem = check_tma_spec(spec);
  if (!problem.empty()) return problem;
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return "the CUDA driver does not provide cuTensorMapEncodeTiled (needs CUDA 12 or newer)";
  cuuint64_t dims[kTmaMaxRank], strides[kTmaMaxRank];
  cuuint32_t box[kTmaMaxRank], elem_strides[kTmaMaxRank];
  for (int i = 0; i < spec.rank; ++i) {
    dims[i] = spec.dims[i];
    box[i] = spec.box[i];
    elem_strides[i] = i == 0 ? 1 : spec.elem_strides[i];
    if (i > 0) strides[i - 1] = spec.strides[i];
  }
  const CUresult result =
      encode(reinterpret_cast<CUtensorMap*>(out), cu_elem_type(spec.elem_bytes), static_cast<cuuint32_t>(spec.rank),
             const_cast<void*>(spec.base), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
             cu_swizzle(spec.swizzle), CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (result != CUDA_SUCCESS) return "cuTensorMapEncodeTiled failed with CUresult " + std::to_string(result);
  return "";
}

#endif  // !LLM2VEC_FAST_TMA_EMULATED

}  // namespace l2vf

#endif  // LLM2VEC_FAST_TMA_HOST_H
