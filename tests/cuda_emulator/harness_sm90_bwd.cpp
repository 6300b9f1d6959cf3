// The Hopper backward of csrc/ (flash_attn/hopper/bwd_sm90.cuh, bwd_dq_sm90.cuh) on the CPU emulator's sm_90
// model, for tests/test_cuda_emulated_sm90_bwd.py through ctypes: harness_sm90.cpp (the registry, the mask
// packer, the Hopper forward) plus the entry points that do what csrc/flash_api.cpp does on an sm_90 GPU for
// the backward (both paths on the Hopper kernels), one that sets the order the emulator runs blocks in, and one
// that sets the persistent grids' size.
#include "harness_sm90.cpp"  // NOLINT(bugprone-suspicious-include): one library, one registry

#include "flash_attn/hopper/configs_bwd_sm90.cuh"

namespace {

// The persistent grids' size of later backward launches (emu_set_backward_ctas); the forward's by default.
int g_backward_ctas = kEmulatedSms;

}  // namespace

extern "C" {

// As emu_backward; dq_accum->data == null selects the deterministic path (dK/dV kernel, then the dQ kernel).
int emu_backward_sm90(int elem, const l2vf::AttnArgs* args, const l2vf::TensorView* mask, uint32_t* key_bits,
                      const l2vf::TensorView* dout, const l2vf::TensorView* out, const float* lse, const float* dlse,
                      float* lse_log2, float* delta, const l2vf::TensorView* dq, const l2vf::TensorView* dk,
                      const l2vf::TensorView* dv, const l2vf::TensorView* dq_accum) {
  g_error.clear();
  if (pack_mask(mask, key_bits) != 0) return 1;
  l2vf::AttnArgs a = *args;
  a.key_bits = mask != nullptr ? key_bits : nullptr;
  const l2vf::BwdParams p =
      l2vf::make_bwd_params(a, *dout, *out, lse, dlse, lse_log2, delta, *dq, *dk, *dv, *dq_accum);
  const int64_t kv_tokens = a.cu_seqlens_q != nullptr ? a.k.size[0] : a.k.size[1];
  return dispatch(elem, static_cast<int>(a.q.size[a.q.dim - 1]), [&](auto e, auto d) {
    using Elem = decltype(e);
    constexpr int kHeadDim = decltype(d)::value;
    l2vf::HopperBwdLaunchParams lp;
    g_error = l2vf::make_hopper_bwd_launch_params<Elem, kHeadDim>(p, kv_tokens, g_backward_ctas, lp);
    if (!g_error.empty()) return 1;
    if (l2vf::launch_bwd_preprocess<Elem, kHeadDim>(p, EmuLaunchSm90{}) != 0) return 1;
    return l2vf::launch_backward_sm90<Elem, kHeadDim>(lp, EmuLaunchSm90{});
  });
}

// The order the emulator runs each later launch's blocks in: 0 = launch order, else a permutation the seed fixes.
void emu_set_block_order(uint64_t seed) { emu::emulator().block_order_seed = seed; }

// At most how many blocks each later backward launch runs (each walks work tiles c, c + ctas, ...).
void emu_set_backward_ctas(int ctas) { g_backward_ctas = ctas; }

}  // extern "C"
