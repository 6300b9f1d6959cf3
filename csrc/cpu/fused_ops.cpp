// Fused elementwise CPU ops for the token-wise parts of a decoder layer: RMSNorm, SwiGLU, rotary embedding.
// llm2vec_fast/cpu_fused.py builds and loads this file on first use; llm2vec_fast/hf/fused_cpu.py routes a model's
// RMSNorm and SwiGLU MLP modules and its rotary embedding through them.
//
// Eager PyTorch runs HF's RMSNorm as five passes over the activations (pow, mean, add, rsqrt-mul, weight-mul),
// SwiGLU as two (silu, mul) and the rotary embedding as six, each through memory; here each is one pass. The
// arithmetic is HF's, in float32, with ATen's own vector math (at::vec, Sleef's exp as torch's silu uses it): only
// the order of the RMSNorm sum of squares differs from torch's reduction. Built with -ffp-contract=off: no
// multiply-add is fused, so each result is rounded where eager rounds it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>

namespace {

using Vec = at::vec::Vectorized<float>;

// Rows per task for at::parallel_for: about 32k elements, so that a task outweighs its scheduling.
int64_t grain_rows(int64_t row_size) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_size)); }

void check_float_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
}

// weight * (x * rsqrt(mean(x^2, -1) + eps)) over the last dimension: HF's Llama RMSNorm in float32.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_float_cpu(x, "rms_norm", "x");
  check_float_cpu(weight, "rms_norm", "weight");
  TORCH_CHECK(x.dim() >= 1, "rms_norm: x must have at least one dimension");
  const int64_t n = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == n, "rms_norm: weight must have shape (", n,
              ",) to match the last dimension of x, got ", weight.sizes());
  const at::Tensor input = x.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(input);
  if (input.numel() == 0) return out;
  const int64_t rows = input.numel() / n;
  const float* in_data = input.const_data_ptr<float>();
  const float* w_data = w.const_data_ptr<float>();
  float* out_data = out.mutable_data_ptr<float>();
  const float epsilon = static_cast<float>(eps);
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* in_row = in_data + row * n;
      float* out_row = out_data + row * n;
      Vec squares(0.f);
      int64_t i = 0;
      for (; i + Vec::size() <= n; i += Vec::size()) {
        const Vec v = Vec::loadu(in_row + i);
        squares = squares + v * v;
      }
      float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, squares);
      for (; i < n; ++i) sum += in_row[i] * in_row[i];
      const float inverse = 1.f / std::sqrt(sum / static_cast<float>(n) + epsilon);
      const Vec inverse_vec(inverse);
      at::vec::map2([&](Vec v, Vec g) { return g * (v * inverse_vec); }, out_row, in_row, w_data, n);
    }
  });
  return out;
}

// silu(gate) * up, elementwise: a SwiGLU MLP's activation, bit for bit F.silu(gate) * up.
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  check_float_cpu(gate, "silu_mul", "gate");
  check_float_cpu(up, "silu_mul", "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "silu_mul: gate and up must have the same shape, got ", gate.sizes(),
              " and ", up.sizes());
  const at::Tensor g = gate.contiguous();
  const at::Tensor u = up.contiguous();
  at::Tensor out = at::empty_like(g);
  const float* g_data = g.const_data_ptr<float>();
  const float* u_data = u.const_data_ptr<float>();
  float* out_data = out.mutable_data_ptr<float>();
  // torch's silu, tail included: the same parallel split (at::internal::GRAIN_SIZE), then in each piece vectors of
  // two lanes' width with Sleef's exp and the rest with std::exp (ATen's vectorized_loop).
  const Vec one(1.f);
  constexpr int64_t step = 2 * Vec::size();
  at::parallel_for(0, g.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + step <= end; i += step) {
      for (int64_t j = i; j < i + step; j += Vec::size()) {
        const Vec x = Vec::loadu(g_data + j);
        ((x / (one + x.neg().exp())) * Vec::loadu(u_data + j)).store(out_data + j);
      }
    }
    for (; i < end; ++i) {
      const float x = g_data[i];
      out_data[i] = (x / (1.f + std::exp(-x))) * u_data[i];
    }
  });
  return out;
}

// x * cos + rotate_half(x) * sin for x (B, H, S, D) with a last stride of 1 and cos, sin (B or 1, S, D): HF's
// apply_rotary_pos_emb for one of q and k, rounded as eager rounds it (three roundings; -a * b == -(a * b)).
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_float_cpu(x, "rotary", "x");
  check_float_cpu(cos, "rotary", "cos");
  check_float_cpu(sin, "rotary", "sin");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1,
              "rotary: x must be (batch, heads, seq, head_dim) with a last stride of 1");
  const int64_t batch = x.size(0), heads = x.size(1), seq = x.size(2), dim = x.size(3), half = dim / 2;
  TORCH_CHECK(dim % 2 == 0, "rotary: head_dim must be even, got ", dim);
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 3 && (t->size(0) == batch || t->size(0) == 1) && t->size(1) == seq && t->size(2) == dim,
                "rotary: cos and sin must be (", batch, " or 1, ", seq, ", ", dim, "), got ", t->sizes());
  }
  const at::Tensor c = cos.contiguous();
  const at::Tensor s = sin.contiguous();
  at::Tensor out = at::empty_like(x);
  if (x.numel() == 0) return out;
  const bool shared = c.size(0) == 1 && batch > 1;
  const float* x_data = x.const_data_ptr<float>();
  const float* c_data = c.const_data_ptr<float>();
  const float* s_data = s.const_data_ptr<float>();
  float* out_data = out.mutable_data_ptr<float>();
  const int64_t x_strides[3] = {x.stride(0), x.stride(1), x.stride(2)};
  const int64_t o_strides[3] = {out.stride(0), out.stride(1), out.stride(2)};
  at::parallel_for(0, batch * seq, grain_rows(heads * dim), [&](int64_t begin, int64_t end) {
    for (int64_t token = begin; token < end; ++token) {
      const int64_t b = token / seq, position = token % seq;
      const int64_t angle_row = (shared ? position : token) * dim;
      const float* cr = c_data + angle_row;
      const float* sr = s_data + angle_row;
      for (int64_t h = 0; h < heads; ++h) {
        const float* xr = x_data + b * x_strides[0] + h * x_strides[1] + position * x_strides[2];
        float* orow = out_data + b * o_strides[0] + h * o_strides[1] + position * o_strides[2];
        int64_t i = 0;
        for (; i + Vec::size() <= half; i += Vec::size()) {
          const Vec x1 = Vec::loadu(xr + i), x2 = Vec::loadu(xr + half + i);
          (x1 * Vec::loadu(cr + i) - x2 * Vec::loadu(sr + i)).store(orow + i);
          (x2 * Vec::loadu(cr + half + i) + x1 * Vec::loadu(sr + half + i)).store(orow + half + i);
        }
        for (; i < half; ++i) {
          const float x1 = xr[i], x2 = xr[half + i];
          orow[i] = x1 * cr[i] - x2 * sr[i];
          orow[half + i] = x2 * cr[half + i] + x1 * sr[half + i];
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(llm2vec_fast_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(llm2vec_fast_cpu, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("silu_mul", silu_mul);
  m.impl("rotary", rotary);
}
