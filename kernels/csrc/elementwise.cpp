// A decode step's glue in one op each: RMSNorm (torch's F.rms_norm is composite on CPU: pow, mean, add, rsqrt,
// mul, about 25 us a call for one SmolLM2 row in float32 and 50 us in half precision with its two casts, twice
// per layer), SiLU(gate) * up (chunk, silu, mul) and rotary positions (mul, roll, mul, add). float32, float16 or
// bfloat16 tensors; half precision is computed in float32 and rounded where torch's op sequence (HF's formulas)
// rounds. And an encoder's residual add with LayerNorm (float32), one pass instead of three.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "half.h"
#include "vector_math.h"

namespace {

using energon_hf::dispatch;
using energon_hf::from_float;
using energon_hf::round_to;
using energon_hf::to_float;

// out = weight * (x * rsqrt(mean(x^2) + eps)) in HF's LlamaRMSNorm's order: normalize in float32, round to the
// input's dtype, then multiply by the weight (a product in the input's dtype, rounded once).
// float32 rows in place: no conversion buffers (a SiLU-and-mul of one SmolLM2 row 8.5 us in a decode step, 13 us
// through them).
void rms_norm_rows(const float* xp, const float* wp, float* op, int64_t rows, int64_t width, float eps) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* in = xp + r * width;
      float* dst = op + r * width;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < width; ++i) squares += in[i] * in[i];
      const float scale = 1.f / std::sqrt(squares / static_cast<float>(width) + eps);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) dst[i] = wp[i] * (in[i] * scale);
    }
  });
}

// dst[i] = silu(gate[i]) * up[i] (`up` null: silu alone) = gate / (1 + e^-gate) * up.
inline void silu_span(const float* gate, const float* up, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = energon_hf::exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e));
    _mm256_storeu_ps(dst + i, up ? _mm256_mul_ps(silu, _mm256_loadu_ps(up + i)) : silu);
  }
#endif
  for (; i < n; ++i) dst[i] = gate[i] / (1.f + std::exp(-gate[i])) * (up ? up[i] : 1.f);
}

void silu_and_mul_rows(const float* xp, float* op, int64_t rows, int64_t width) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = xp + r * 2 * width;
      silu_span(gate, gate + width, op + r * width, width);
    }
  });
}

// Half precision: rows converted to float32 buffers, computed there, rounded where torch rounds.
template <class T>
void rms_norm_rows(const T* xp, const T* wp, T* op, int64_t rows, int64_t width, float eps) {
  std::vector<float> weight(width);
  to_float(wp, weight.data(), width);
  // Threads only pay for many rows (a prompt); a decode step's few rows stay on the calling thread.
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> row(width);
    for (int64_t r = begin; r < end; ++r) {
      to_float(xp + r * width, row.data(), width);
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < width; ++i) squares += row[i] * row[i];
      const float scale = 1.f / std::sqrt(squares / static_cast<float>(width) + eps);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) row[i] *= scale;
      round_to(row.data(), op + r * width, width);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) row[i] *= weight[i];
      from_float(row.data(), op + r * width, width);
    }
  });
}

// silu(gate) * up, each op rounded to T as torch's silu then mul are.
template <class T>
void silu_and_mul_rows(const T* xp, T* op, int64_t rows, int64_t width) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> gate(width), up(width);
    for (int64_t r = begin; r < end; ++r) {
      to_float(xp + r * 2 * width, gate.data(), width);
      to_float(xp + r * 2 * width + width, up.data(), width);
      silu_span(gate.data(), nullptr, gate.data(), width);
      round_to(gate.data(), op + r * width, width);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) gate[i] *= up[i];
      from_float(gate.data(), op + r * width, width);
    }
  });
}

// Rotary positions, HF's rotate-half layout as kernels/elementwise.py's rotary computes it: out = x * cos +
// roll(x, D / 2) * signed_sin, each product and the sum rounded to T as torch's four ops are. The products and
// the sum are separate loops over stored rows, so the compiler cannot fuse them into FMAs (which round once):
// float32 is bit for bit torch's too (tests/test_kernels.py). x [T, H, D] with its heads' rows dense (any token
// stride: q and k are a slice of the fused qkv projection), cos and signed_sin [T, D]. In torch the four ops and
// the roll's copy cost about 20 us per SmolLM2 layer at one token.
template <class T>
void rotary_rows(const T* x, int64_t token_stride, const T* cos, const T* sin, T* out, int64_t tokens, int64_t heads,
                 int64_t dim) {
  const int64_t half = dim / 2;
  at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> c(dim), sn(dim), row(dim), a(dim), b(dim);
    std::vector<T> scratch(dim);
    for (int64_t t = begin; t < end; ++t) {
      to_float(cos + t * dim, c.data(), dim);
      to_float(sin + t * dim, sn.data(), dim);
      for (int64_t h = 0; h < heads; ++h) {
        to_float(x + t * token_stride + h * dim, row.data(), dim);
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) a[i] = row[i] * c[i];
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) b[i] = row[i + half] * sn[i];
#pragma omp simd
        for (int64_t i = half; i < dim; ++i) b[i] = row[i - half] * sn[i];
        round_to(a.data(), scratch.data(), dim);
        round_to(b.data(), scratch.data(), dim);
#pragma omp simd
        for (int64_t i = 0; i < dim; ++i) a[i] += b[i];
        from_float(a.data(), out + (t * heads + h) * dim, dim);
      }
    }
  });
}

// out = LayerNorm((x + bias) + residual) over each row, float32: a post-LayerNorm encoder layer's close (BERT:
// LayerNorm(dense(h) + input)), with the projection's bias added here instead of in its GEMM. One pass over memory
// where torch takes three (addmm's bias broadcast, the add, LayerNorm: 4.2 + 5.6 + 5.2 ms per [4089, 768] in
// bert-base at batch 32); each row stays in L1 between its sum, its variance and its output. `bias` may be null.
void add_layer_norm_rows(const float* xp, const float* rp, const float* bp, const float* wp, const float* betap,
                         float* op, int64_t rows, int64_t width, float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* x = xp + r * width;
      const float* res = rp + r * width;
      float* dst = op + r * width;
      float sum = 0.f;
      if (bp) {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < width; ++i) {
          dst[i] = (x[i] + bp[i]) + res[i];
          sum += dst[i];
        }
      } else {
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < width; ++i) {
          dst[i] = x[i] + res[i];
          sum += dst[i];
        }
      }
      const float mean = sum / static_cast<float>(width);
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < width; ++i) squares += (dst[i] - mean) * (dst[i] - mean);
      const float rstd = 1.f / std::sqrt(squares / static_cast<float>(width) + eps);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) dst[i] = (dst[i] - mean) * rstd * wp[i] + betap[i];
    }
  });
}

bool supported(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(supported(x) && x.is_contiguous() && x.dim() >= 1,
              "rms_norm: x must be a contiguous float32, float16 or bfloat16 tensor");
  const int64_t width = x.size(-1), rows = width ? x.numel() / width : 0;
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() && weight.dim() == 1 &&
                  weight.size(0) == width,
              "rms_norm: weight must be a contiguous [", width, "] tensor of x's dtype");
  at::Tensor out = at::empty_like(x);
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows(x.data_ptr<T>(), weight.data_ptr<T>(), out.data_ptr<T>(), rows, width, static_cast<float>(eps));
  });
  return out;
}

// (x + delta, rms_norm(x + delta)): a pre-norm layer's residual add and the norm after it in one op (60 torch adds
// fewer in a SmolLM2 decode step). The sum is rounded to x's dtype as torch's add rounds it; the norm is rms_norm's.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                                                double eps) {
  TORCH_CHECK(supported(x) && x.is_contiguous() && x.dim() >= 1 && delta.is_contiguous() &&
                  delta.scalar_type() == x.scalar_type() && delta.sizes() == x.sizes(),
              "add_rms_norm: x and delta must be contiguous float32, float16 or bfloat16 tensors of one shape and "
              "dtype");
  at::Tensor sum = at::empty_like(x);
  const int64_t n = x.numel();
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const T* dp = delta.data_ptr<T>();
    T* sp = sum.data_ptr<T>();
    if constexpr (std::is_same_v<T, float>) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) sp[i] = xp[i] + dp[i];
    } else {
      std::vector<float> a(n), b(n);
      to_float(xp, a.data(), n);
      to_float(dp, b.data(), n);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) a[i] += b[i];
      from_float(a.data(), sp, n);
    }
  });
  return {sum, rms_norm(sum, weight, eps)};
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  TORCH_CHECK(supported(x) && x.dim() == 3 && x.stride(2) == 1 && x.stride(1) == x.size(2) && x.size(2) % 2 == 0,
              "rotary: x must be a [tokens, heads, head_dim] float32, float16 or bfloat16 tensor with dense heads "
              "and an even head_dim");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  for (const at::Tensor* t : {&cos, &signed_sin})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->is_contiguous() && t->numel() == tokens * dim,
                "rotary: cos and signed_sin must be contiguous [tokens, 1, head_dim] tensors of x's dtype");
  at::Tensor out = at::empty({tokens, heads, dim}, x.options());
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    rotary_rows(x.data_ptr<T>(), x.stride(0), cos.data_ptr<T>(), signed_sin.data_ptr<T>(), out.data_ptr<T>(), tokens,
                heads, dim);
  });
  return out;
}

at::Tensor add_layer_norm(const at::Tensor& x, const at::Tensor& residual, const std::optional<at::Tensor>& bias,
                          const at::Tensor& weight, const at::Tensor& beta, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1,
              "add_layer_norm: x must be a contiguous float32 tensor");
  const int64_t width = x.size(-1), rows = width ? x.numel() / width : 0;
  TORCH_CHECK(residual.scalar_type() == at::kFloat && residual.is_contiguous() && residual.sizes() == x.sizes(),
              "add_layer_norm: residual must be a contiguous float32 tensor of x's shape");
  for (const at::Tensor* t : {&weight, &beta})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 1 && t->size(0) == width,
                "add_layer_norm: weight and beta must be contiguous float32 [", width, "] tensors");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->dim() == 1 &&
                    bias->size(0) == width,
                "add_layer_norm: bias must be a contiguous float32 [", width, "] tensor");
    bp = bias->data_ptr<float>();
  }
  at::Tensor out = at::empty_like(x);
  add_layer_norm_rows(x.data_ptr<float>(), residual.data_ptr<float>(), bp, weight.data_ptr<float>(),
                      beta.data_ptr<float>(), out.data_ptr<float>(), rows, width, static_cast<float>(eps));
  return out;
}

// x [..., 2I] (gate, then up: Llama's fused gate_up projection) -> silu(gate) * up [..., I].
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(supported(x) && x.is_contiguous() && x.dim() >= 1 && x.size(-1) % 2 == 0,
              "silu_and_mul: x must be a contiguous float32, float16 or bfloat16 tensor with an even last dimension");
  const int64_t width = x.size(-1) / 2, rows = width ? x.numel() / (2 * width) : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = width;
  at::Tensor out = at::empty(shape, x.options());
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    silu_and_mul_rows(x.data_ptr<T>(), out.data_ptr<T>(), rows, width);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(energon_hf, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor signed_sin) -> Tensor");
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor? bias, Tensor weight, Tensor beta, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(energon_hf, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary", &rotary);
  m.impl("add_layer_norm", &add_layer_norm);
}
