// The key-padding mask packer, and the probe for this build's architectures (every kernel is
// compiled for the same ones).
#include "flash_attn/launch.cuh"
#include "flash_attn/mask_bits.cuh"

namespace l2vf {
cudaError_t run_pack_key_bits(const MaskParams& p, cudaStream_t stream) {
  return CudaLaunch{stream}(pack_key_bits_kernel, pack_key_bits_grid(p), kPackThreads, 0, p);
}

cudaError_t probe_kernel_image() {
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, pack_key_bits_kernel);
  if (err != cudaSuccess) cudaGetLastError();  // not sticky: clear it
  return err;
}
}  // namespace l2vf
