// The Hopper forward of csrc/ (flash_attn/hopper/) on the CPU emulator with its sm_90 model
// (emulator_sm90.h), for tests/test_cuda_emulated_sm90.py through ctypes. This is harness.cpp (the
// buffer registry, the mask packer, the sm80 kernels whose backward checks this forward's lse) plus
// one entry point that does what csrc/flash_api.cpp does on an sm_90 GPU: pack the key mask, build
// the parameters and tensor maps with the shared builders, launch the Hopper kernel.
#include "emulator.h"      // first: replaces csrc/flash_attn/ptx.cuh
#include "emulator_sm90.h"  // then ptx_sm90.cuh (and the tensor-map encoder of tma_host.h)

#include "harness.cpp"  // NOLINT(bugprone-suspicious-include): one library, one registry

#include "flash_attn/hopper/configs_sm90.cuh"

namespace {

// The persistent grid's size: fewer blocks than most test cases have work tiles, so that blocks take
// several (the ring and the Q tile carry over between them) and some take only empty ones.
constexpr int kEmulatedSms = 3;

// launch_forward_sm90's launcher: the kernel on emu::run_sm90; 0 = success, else the message is in g_error.
struct EmuLaunchSm90 {
  template <class Params>
  int operator()(void (*kernel)(Params), dim3 grid, int threads, int smem_bytes, const Params& p) const {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return 0;
    if (smem_bytes > 227 * 1024) {
      g_error = "the Hopper kernel asks for more than the 227 KB of shared memory an sm_90 block may have";
      return 1;
    }
    g_error = emu::run_sm90(grid, threads, smem_bytes, [&] { kernel(p); });
    return g_error.empty() ? 0 : 1;
  }
};

}  // namespace

extern "C" {

// As emu_forward, on the Hopper kernel; kv_tokens = the length of k/v's token dimension.
int emu_forward_sm90(int elem, const l2vf::AttnArgs* args, const l2vf::TensorView* mask, uint32_t* key_bits,
                     const l2vf::TensorView* out, float* lse) {
  g_error.clear();
  if (pack_mask(mask, key_bits) != 0) return 1;
  l2vf::AttnArgs a = *args;
  a.key_bits = mask != nullptr ? key_bits : nullptr;
  const l2vf::FwdParams p = l2vf::make_fwd_params(a, *out, lse);
  const int64_t kv_tokens = a.cu_seqlens_q != nullptr ? a.k.size[0] : a.k.size[1];
  return dispatch(elem, static_cast<int>(a.q.size[a.q.dim - 1]), [&](auto e, auto d) {
    using Cfg = typename l2vf::HopperConfigs<decltype(e), decltype(d)::value>::Fwd;
    l2vf::HopperFwdParams hp;
    g_error = l2vf::make_hopper_fwd_params<Cfg>(p, kv_tokens, kEmulatedSms, hp);
    if (!g_error.empty()) return 1;
    return l2vf::launch_forward_sm90<decltype(e), decltype(d)::value>(hp, EmuLaunchSm90{});
  });
}

}  // extern "C"
