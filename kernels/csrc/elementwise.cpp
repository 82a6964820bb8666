// A decode step's glue in one op each, float32: RMSNorm (torch's F.rms_norm is composite on CPU: pow, mean, add,
// rsqrt, mul, about 25 us a call for one SmolLM2 row, twice per layer) and SiLU(gate) * up (chunk, silu, mul).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

// out = weight * (x * rsqrt(mean(x^2) + eps)), rounded in HF's LlamaRMSNorm's order (normalize, then weight).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1,
              "rms_norm: x must be a contiguous float32 tensor");
  const int64_t width = x.size(-1), rows = width ? x.numel() / width : 0;
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.dim() == 1 &&
                  weight.size(0) == width,
              "rms_norm: weight must be a contiguous float32 [", width, "] tensor");
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Threads only pay for many rows (a prompt); a decode step's few rows stay on the calling thread.
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* in = xp + row * width;
      float* dst = op + row * width;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < width; ++i) squares += in[i] * in[i];
      const float scale = 1.f / std::sqrt(squares / static_cast<float>(width) + static_cast<float>(eps));
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) dst[i] = wp[i] * (in[i] * scale);
    }
  });
  return out;
}

// x [..., 2I] (gate, then up: Llama's fused gate_up projection) -> silu(gate) * up [..., I].
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1 && x.size(-1) % 2 == 0,
              "silu_and_mul: x must be a contiguous float32 tensor with an even last dimension");
  const int64_t width = x.size(-1) / 2, rows = width ? x.numel() / (2 * width) : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = width;
  at::Tensor out = at::empty(shape, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* gate = xp + row * 2 * width;
      const float* up = gate + width;
      float* dst = op + row * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) dst[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(energon_hf, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(energon_hf, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
}
