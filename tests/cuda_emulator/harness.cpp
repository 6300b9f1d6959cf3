// C entry points that run the attention kernels of csrc/ on the CPU emulator (emulator.h), for
// tests/test_cuda_emulated.py through ctypes. They mirror what csrc/flash_api.cpp does on a GPU:
// pack the key mask, build the parameters with the shared params_builder.h, launch the same
// sequence of kernels (configs.cuh). Every tensor a kernel may touch is registered first.
#include "emulator.h"  // first: replaces csrc/flash_attn/ptx.cuh

#include <string>

#include "flash_attn/configs.cuh"
#include "flash_attn/mask_bits.cuh"
#include "flash_attn/params_builder.h"

namespace {

std::string g_error;

// A launcher for configs.cuh's launch sequences: 0 = success, else the message is in g_error.
struct EmuLaunch {
  template <class Params>
  int operator()(void (*kernel)(Params), dim3 grid, int threads, int smem_bytes, const Params& p) const {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0) return 0;
    if (smem_bytes > 227 * 1024) {
      g_error = "a kernel asks for more shared memory than any GPU has per block";
      return 1;
    }
    g_error = emu::emulator().run(grid, threads, smem_bytes, [&] { kernel(p); });
    return g_error.empty() ? 0 : 1;
  }
};

template <class F>
int dispatch(int elem, int head_dim, F&& f) {
  if (elem == 0 && head_dim == 64) return f(l2vf::Fp16{}, std::integral_constant<int, 64>{});
  if (elem == 0 && head_dim == 128) return f(l2vf::Fp16{}, std::integral_constant<int, 128>{});
  if (elem == 1 && head_dim == 64) return f(l2vf::Bf16{}, std::integral_constant<int, 64>{});
  if (elem == 1 && head_dim == 128) return f(l2vf::Bf16{}, std::integral_constant<int, 128>{});
  g_error = "no kernels for this dtype / head dim";
  return 1;
}

int pack_mask(const l2vf::TensorView* mask, uint32_t* bits) {
  if (mask == nullptr) return 0;
  const l2vf::MaskParams mp = l2vf::make_mask_params(*mask, bits);
  return EmuLaunch{}(l2vf::pack_key_bits_kernel, l2vf::pack_key_bits_grid(mp), l2vf::kPackThreads, 0, mp);
}

}  // namespace

extern "C" {

const char* emu_last_error() { return g_error.c_str(); }

void emu_clear_buffers() { emu::emulator().buffers.clear(); }

void emu_register_buffer(const void* data, int64_t bytes, const char* name, int writable) {
  emu::Buffer b;
  b.base = static_cast<const char*>(data);
  b.bytes = static_cast<size_t>(bytes);
  b.name = name;
  b.writable = writable != 0;
  b.stored.assign((b.bytes + 3) / 4, 0);
  emu::emulator().buffers.push_back(std::move(b));
}

// mask may be null; key_bits: (B, key_bits_words(Sk)) scratch, used when mask is set.
int emu_forward(int elem, const l2vf::AttnArgs* args, const l2vf::TensorView* mask, uint32_t* key_bits,
                const l2vf::TensorView* out, float* lse) {
  g_error.clear();
  if (pack_mask(mask, key_bits) != 0) return 1;
  l2vf::AttnArgs a = *args;
  a.key_bits = mask != nullptr ? key_bits : nullptr;
  const l2vf::FwdParams p = l2vf::make_fwd_params(a, *out, lse);
  return dispatch(elem, static_cast<int>(a.q.size[a.q.dim - 1]), [&](auto e, auto d) {
    return l2vf::launch_forward<decltype(e), decltype(d)::value>(p, EmuLaunch{});
  });
}

// dq_accum->data == null selects the deterministic path; otherwise the caller turns the float32
// dq_accum into dq (scale and cast), as the binding does.
int emu_backward(int elem, const l2vf::AttnArgs* args, const l2vf::TensorView* mask, uint32_t* key_bits,
                 const l2vf::TensorView* dout, const l2vf::TensorView* out, const float* lse, const float* dlse,
                 float* lse_log2, float* delta, const l2vf::TensorView* dq, const l2vf::TensorView* dk,
                 const l2vf::TensorView* dv, const l2vf::TensorView* dq_accum) {
  g_error.clear();
  if (pack_mask(mask, key_bits) != 0) return 1;
  l2vf::AttnArgs a = *args;
  a.key_bits = mask != nullptr ? key_bits : nullptr;
  const l2vf::BwdParams p =
      l2vf::make_bwd_params(a, *dout, *out, lse, dlse, lse_log2, delta, *dq, *dk, *dv, *dq_accum);
  return dispatch(elem, static_cast<int>(a.q.size[a.q.dim - 1]), [&](auto e, auto d) {
    return l2vf::launch_backward<decltype(e), decltype(d)::value>(p, EmuLaunch{});
  });
}

int emu_key_bits_words(int64_t seqlen_k) { return l2vf::key_bits_words(seqlen_k); }
int64_t emu_sizeof_attn_args() { return sizeof(l2vf::AttnArgs); }
int64_t emu_sizeof_tensor_view() { return sizeof(l2vf::TensorView); }

}  // extern "C"
