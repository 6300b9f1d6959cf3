// The torch binding of the CUDA attention kernels: torch.ops.llm2vec_fast_cuda.fwd / bwd.
//
// Inputs arrive validated by llm2vec_fast (shapes, dtypes, devices, masks); this layer checks what
// the kernels themselves require (CUDA, sm_80+, fp16/bf16, a compiled head dim, 16-byte aligned
// rows, packed key-mask rows), allocates outputs and scratch, and launches. The key mask arrives
// packed to bits by pack_key_mask, which llm2vec_fast calls once per mask (llm2vec_fast/key_masks.py),
// not once per layer. Parameters are
// built by flash_attn/params_builder.h, shared with the CPU emulator tests.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#include "flash_attn/api.h"
#include "flash_attn/params_builder.h"
#ifdef LLM2VEC_FAST_SM90  // setup.py defines it when the Hopper kernels (csrc/fwd_sm90_*.cu, bwd_sm90_*.cu) are built
#include "flash_attn/hopper/api_sm90.h"
#endif

namespace {

using at::Tensor;

// Set to 1 to fill every output with NaN before the kernels run, so elements a kernel fails to
// write show up in tests (tests/test_cuda_backend.py sets it).
bool poison_outputs() {
  const char* v = std::getenv("LLM2VEC_FAST_CUDA_POISON_OUTPUTS");
  return v != nullptr && v[0] == '1';
}

Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  Tensor t = at::empty(shape, options);
  if (poison_outputs()) t.fill_(std::numeric_limits<float>::quiet_NaN());
  return t;
}

// The tensor itself when the kernels can read it in place (last dimension contiguous, other
// strides multiples of 8 elements, data 16-byte aligned: every row a whole number of 16-byte
// chunks), else a contiguous copy.
Tensor kernel_ready(const Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.size(d) <= 1 || t.stride(d) % 8 == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

l2vf::TensorView view_of(const Tensor& t) {
  l2vf::TensorView v{};
  v.data = t.defined() ? t.data_ptr() : nullptr;
  v.dim = t.defined() ? static_cast<int>(t.dim()) : 0;
  for (int d = 0; d < v.dim; ++d) {
    v.size[d] = t.size(d);
    v.stride[d] = t.stride(d);
  }
  return v;
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "llm2vec_fast_cuda: q, k and v must be CUDA tensors");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "llm2vec_fast_cuda: dtype must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "llm2vec_fast_cuda: q, k and v must share one dtype");
  const int64_t head_dim = q.size(-1);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "llm2vec_fast_cuda: head_dim must be 64 or 128, got ", head_dim);
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  TORCH_CHECK(major >= 8, "llm2vec_fast_cuda: the kernels need compute capability 8.0 or newer");
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "llm2vec_fast_cuda: ", what, " failed: ", cudaGetErrorString(err));
}

// Calls f(Elem{}, std::integral_constant<int, head_dim>{}) for the compiled instantiations.
template <class F>
cudaError_t dispatch(at::ScalarType dtype, int64_t head_dim, F&& f) {
  const bool half = dtype == at::kHalf;
  if (head_dim == 64) {
    return half ? f(l2vf::Fp16{}, std::integral_constant<int, 64>{}) : f(l2vf::Bf16{}, std::integral_constant<int, 64>{});
  }
  return half ? f(l2vf::Fp16{}, std::integral_constant<int, 128>{}) : f(l2vf::Bf16{}, std::integral_constant<int, 128>{});
}

// Whether the forward runs the Hopper kernel: this build has it, the device is compute capability 9.x with
// the shared memory it needs, and the scores are soft-capped or scaled by a positive factor (the plain
// softmax folds the scale into its exponent, which needs the row max of the raw scores to be the max of
// the scaled ones). LLM2VEC_FAST_CUDA_HOPPER=0 keeps the sm80 kernel there (for comparisons).
bool use_hopper_forward(int device, int64_t head_dim, double softcap, double softmax_scale) {
#ifdef LLM2VEC_FAST_SM90
  const char* env = std::getenv("LLM2VEC_FAST_CUDA_HOPPER");
  if ((env != nullptr && env[0] == '0') || (softcap <= 0.0 && softmax_scale <= 0.0)) return false;
  int major = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int needed = head_dim == 64 ? l2vf::smem_bytes_needed_sm90<l2vf::Bf16, 64>()
                                    : l2vf::smem_bytes_needed_sm90<l2vf::Bf16, 128>();
  return major == 9 && smem_optin >= needed;
#else
  (void)device, (void)head_dim, (void)softcap, (void)softmax_scale;
  return false;
#endif
}

// The Hopper forward for the compiled instantiations; kv_tokens = the length of k/v's token dimension.
void run_hopper_forward(const l2vf::FwdParams& p, at::ScalarType dtype, int64_t head_dim, int64_t kv_tokens,
                        cudaStream_t stream) {
#ifdef LLM2VEC_FAST_SM90
  const bool half = dtype == at::kHalf;
  const std::string problem =
      head_dim == 64
          ? (half ? l2vf::run_fwd_sm90<l2vf::Fp16, 64>(p, kv_tokens, stream)
                  : l2vf::run_fwd_sm90<l2vf::Bf16, 64>(p, kv_tokens, stream))
          : (half ? l2vf::run_fwd_sm90<l2vf::Fp16, 128>(p, kv_tokens, stream)
                  : l2vf::run_fwd_sm90<l2vf::Bf16, 128>(p, kv_tokens, stream));
  TORCH_CHECK(problem.empty(), "llm2vec_fast_cuda: the Hopper attention forward failed: ", problem);
#else
  (void)p, (void)dtype, (void)head_dim, (void)kv_tokens, (void)stream;
  TORCH_CHECK(false, "llm2vec_fast_cuda: this build has no Hopper forward");
#endif
}

// Whether the backward runs the Hopper kernels: this build has them, the device is compute capability 9.x
// with the shared memory they need (any scale or soft cap: the backward reads the saved lse). Both paths:
// atomic dQ, and deterministic=True (the dK/dV kernel without dQ, then the dQ kernel: one writer per element).
// LLM2VEC_FAST_CUDA_HOPPER=0 keeps the sm80 kernels there.
bool use_hopper_backward(int device, int64_t head_dim) {
#ifdef LLM2VEC_FAST_SM90
  const char* env = std::getenv("LLM2VEC_FAST_CUDA_HOPPER");
  if (env != nullptr && env[0] == '0') return false;
  int major = 0, smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int needed = head_dim == 64 ? l2vf::bwd_smem_bytes_needed_sm90<l2vf::Bf16, 64>()
                                    : l2vf::bwd_smem_bytes_needed_sm90<l2vf::Bf16, 128>();
  return major == 9 && smem_optin >= needed;
#else
  (void)device, (void)head_dim;
  return false;
#endif
}

// The Hopper backward (dQ into p.dq_accum with atomics, or into p.dq when p.dq_accum is null) for the compiled
// instantiations; kv_tokens as for the forward.
void run_hopper_backward(const l2vf::BwdParams& p, at::ScalarType dtype, int64_t head_dim, int64_t kv_tokens,
                         cudaStream_t stream) {
#ifdef LLM2VEC_FAST_SM90
  const bool half = dtype == at::kHalf;
  const std::string problem =
      head_dim == 64
          ? (half ? l2vf::run_bwd_sm90<l2vf::Fp16, 64>(p, kv_tokens, stream)
                  : l2vf::run_bwd_sm90<l2vf::Bf16, 64>(p, kv_tokens, stream))
          : (half ? l2vf::run_bwd_sm90<l2vf::Fp16, 128>(p, kv_tokens, stream)
                  : l2vf::run_bwd_sm90<l2vf::Bf16, 128>(p, kv_tokens, stream));
  TORCH_CHECK(problem.empty(), "llm2vec_fast_cuda: the Hopper attention backward failed: ", problem);
#else
  (void)p, (void)dtype, (void)head_dim, (void)kv_tokens, (void)stream;
  TORCH_CHECK(false, "llm2vec_fast_cuda: this build has no Hopper backward");
#endif
}

// A (B, Sk) bool key-padding mask (any strides) packed to the bit rows (B, key_bits_words(Sk)) the kernels read.
Tensor pack_key_mask(const Tensor& mask) {
  TORCH_CHECK(mask.is_cuda(), "llm2vec_fast_cuda: key_mask must be a CUDA tensor");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2, "llm2vec_fast_cuda: key_mask must be a 2-D bool tensor");
  const c10::cuda::CUDAGuard guard(mask.device());
  Tensor bits = at::empty({mask.size(0), l2vf::key_bits_words(mask.size(1))}, mask.options().dtype(at::kInt));
  const l2vf::MaskParams p = l2vf::make_mask_params(view_of(mask), static_cast<uint32_t*>(bits.data_ptr()));
  check_cuda(l2vf::run_pack_key_bits(p, c10::cuda::getCurrentCUDAStream().stream()), "packing the key mask");
  return bits;
}

// The packed mask rows of a padded (B, Sk, ...) k (undefined without a mask or for the varlen layout).
Tensor checked_key_bits(const std::optional<Tensor>& key_bits, const Tensor& k, bool varlen) {
  if (varlen || !key_bits.has_value()) return Tensor();
  const Tensor& bits = *key_bits;
  TORCH_CHECK(bits.scalar_type() == at::kInt && bits.dim() == 2 && bits.is_contiguous() && bits.device() == k.device() &&
                  bits.size(0) == k.size(0) && bits.size(1) == l2vf::key_bits_words(k.size(1)),
              "llm2vec_fast_cuda: key_bits must be the contiguous int32 (batch, key_bits_words(seqlen_k)) rows "
              "that pack_key_mask returns");
  return bits;
}

l2vf::AttnArgs attn_args(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& key_bits,
                         const std::optional<Tensor>& cu_seqlens_q, const std::optional<Tensor>& cu_seqlens_k,
                         int64_t max_seqlen_q, int64_t max_seqlen_k, bool causal, int64_t window_left,
                         int64_t window_right, double softcap, double softmax_scale) {
  l2vf::AttnArgs a{};
  a.q = view_of(q);
  a.k = view_of(k);
  a.v = view_of(v);
  a.key_bits = key_bits.defined() ? static_cast<const uint32_t*>(key_bits.data_ptr()) : nullptr;
  if (cu_seqlens_q.has_value()) {
    TORCH_CHECK(cu_seqlens_k.has_value(), "llm2vec_fast_cuda: cu_seqlens_q and cu_seqlens_k go together");
    TORCH_CHECK(cu_seqlens_q->scalar_type() == at::kInt && cu_seqlens_k->scalar_type() == at::kInt &&
                    cu_seqlens_q->is_contiguous() && cu_seqlens_k->is_contiguous(),
                "llm2vec_fast_cuda: cu_seqlens must be contiguous int32");
    a.cu_seqlens_q = cu_seqlens_q->data_ptr<int>();
    a.cu_seqlens_k = cu_seqlens_k->data_ptr<int>();
    a.num_seqs = static_cast<int>(cu_seqlens_q->numel() - 1);
  }
  a.max_seqlen_q = static_cast<int>(max_seqlen_q);
  a.max_seqlen_k = static_cast<int>(max_seqlen_k);
  a.causal = causal;
  a.window_left = static_cast<int>(std::min<int64_t>(window_left, l2vf::kUnbounded));
  a.window_right = static_cast<int>(std::min<int64_t>(window_right, l2vf::kUnbounded));
  a.softcap = static_cast<float>(softcap);
  a.scale = static_cast<float>(softmax_scale);
  return a;
}

std::vector<int64_t> lse_shape(const Tensor& q, bool varlen) {
  if (varlen) return {q.size(1), q.size(0)};
  return {q.size(0), q.size(2), q.size(1)};
}

std::tuple<Tensor, Tensor> fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                               const std::optional<Tensor>& key_bits, const std::optional<Tensor>& cu_seqlens_q,
                               const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                               bool causal, int64_t window_left, int64_t window_right, double softcap,
                               double softmax_scale) {
  check_inputs(q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const Tensor q = kernel_ready(q_in), k = kernel_ready(k_in), v = kernel_ready(v_in);
  const bool varlen = cu_seqlens_q.has_value();

  Tensor out = new_output(q.sizes(), q.options());
  Tensor lse = new_output(lse_shape(q, varlen), q.options().dtype(at::kFloat));
  const Tensor bits = checked_key_bits(key_bits, k, varlen);
  const l2vf::AttnArgs a = attn_args(q, k, v, bits, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     causal, window_left, window_right, softcap, softmax_scale);
  const l2vf::FwdParams p = l2vf::make_fwd_params(a, view_of(out), lse.data_ptr<float>());
  if (use_hopper_forward(q.get_device(), q.size(-1), softcap, softmax_scale)) {
    run_hopper_forward(p, q.scalar_type(), q.size(-1), varlen ? k.size(0) : k.size(1), stream);
    return {out, lse};
  }
  check_cuda(dispatch(q.scalar_type(), q.size(-1),
                      [&](auto elem, auto dim) { return l2vf::run_fwd<decltype(elem), decltype(dim)::value>(p, stream); }),
             "the attention forward");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> bwd(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                       const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                       const std::optional<Tensor>& dlse, const std::optional<Tensor>& key_bits,
                                       const std::optional<Tensor>& cu_seqlens_q,
                                       const std::optional<Tensor>& cu_seqlens_k, int64_t max_seqlen_q,
                                       int64_t max_seqlen_k, bool causal, int64_t window_left, int64_t window_right,
                                       double softcap, double softmax_scale, bool deterministic) {
  check_inputs(q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const Tensor q = kernel_ready(q_in), k = kernel_ready(k_in), v = kernel_ready(v_in);
  const Tensor out = kernel_ready(out_in), dout = kernel_ready(dout_in.to(q.scalar_type()));
  const bool varlen = cu_seqlens_q.has_value();
  const Tensor lse = lse_in.to(at::kFloat).contiguous();
  const Tensor dlse_c = dlse.has_value() ? dlse->to(at::kFloat).contiguous() : Tensor();

  Tensor lse_log2 = at::empty_like(lse);
  Tensor delta = at::empty_like(lse);
  Tensor dq = new_output(q.sizes(), q.options());
  Tensor dk = new_output(k.sizes(), k.options());
  Tensor dv = new_output(v.sizes(), v.options());
  // Fast path: dQ added with float atomics into a zeroed float32 buffer, scaled and cast after.
  Tensor dq_accum = deterministic ? Tensor() : at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  const Tensor bits = checked_key_bits(key_bits, k, varlen);

  const l2vf::AttnArgs a = attn_args(q, k, v, bits, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     causal, window_left, window_right, softcap, softmax_scale);
  const l2vf::BwdParams p = l2vf::make_bwd_params(
      a, view_of(dout), view_of(out), lse.data_ptr<float>(), dlse_c.defined() ? dlse_c.data_ptr<float>() : nullptr,
      lse_log2.data_ptr<float>(), delta.data_ptr<float>(), view_of(dq), view_of(dk), view_of(dv), view_of(dq_accum));
  if (use_hopper_backward(q.get_device(), q.size(-1))) {
    run_hopper_backward(p, q.scalar_type(), q.size(-1), varlen ? k.size(0) : k.size(1), stream);
  } else {
    const auto run = [&](auto elem, auto dim) {
      return l2vf::run_bwd<decltype(elem), decltype(dim)::value>(p, stream);
    };
    check_cuda(dispatch(q.scalar_type(), q.size(-1), run), "the attention backward");
  }
  if (!deterministic) dq.copy_(dq_accum.mul_(softmax_scale));
  return {dq, dk, dv};
}

// The dynamic shared memory per block the kernels of a head dim need (the device must allow it).
int64_t smem_bytes(int64_t head_dim) {
  TORCH_CHECK(head_dim == 64 || head_dim == 128, "llm2vec_fast_cuda: no kernels for head_dim ", head_dim);
  return head_dim == 64 ? l2vf::smem_bytes_needed<l2vf::Bf16, 64>() : l2vf::smem_bytes_needed<l2vf::Bf16, 128>();
}

// Whether this build has machine code for the device's architecture.
bool has_kernels_for(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  return l2vf::probe_kernel_image() == cudaSuccess;
}

}  // namespace

TORCH_LIBRARY(llm2vec_fast_cuda, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? key_bits, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, bool causal, int window_left, int window_right, float softcap, "
      "float softmax_scale) -> (Tensor out, Tensor lse)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, Tensor? key_bits, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, "
      "int window_left, int window_right, float softcap, float softmax_scale, bool deterministic) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("pack_key_mask(Tensor key_mask) -> Tensor key_bits");
  m.def("smem_bytes(int head_dim) -> int", &smem_bytes);
  m.def("has_kernels_for(int device) -> bool", &has_kernels_for);
}

TORCH_LIBRARY_IMPL(llm2vec_fast_cuda, CUDA, m) {
  m.impl("fwd", &fwd);
  m.impl("bwd", &bwd);
  m.impl("pack_key_mask", &pack_key_mask);
}

// `import llm2vec_fast._cuda` loads this library, which registers the ops above.
extern "C" PyObject* PyInit__cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT,
                               "_cuda",
                               "CUDA attention kernels: the ops live in torch.ops.llm2vec_fast_cuda",
                               -1,
                               nullptr,
                               nullptr,
                               nullptr,
                               nullptr,
                               nullptr};
  return PyModule_Create(&module);
}
