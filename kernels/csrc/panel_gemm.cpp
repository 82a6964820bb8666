// float32 products with a weight laid out in column panels: W [N, K] held as panels [ceil(N / 32), K, 32], panel p
// holding output features 32p .. 32p + 31 (zeros past N), each k's 32 weights side by side. x [M, K] @ W^T (+ bias)
// runs as tiles of up to 12 rows of x by one panel: 24 512-bit accumulators in registers, per k two weight vectors
// loaded and one broadcast of x per row. A panel is one contiguous stream that every tile of rows reads again from
// cache, so the weights come from memory once per product and the arithmetic is FMA-bound from a few rows on,
// where torch's GEMM (MKL) packs the weight on every call: SmolLM2's 120 layer matrices, cold, one process
// alternating (2-core Xeon with AMX, 2026-12-07), 16.5 / 16.7 / 16.4 / 21.1 / 26.8 / 35.1 / 54.5 / 90.4 / 333.3 ms
// against F.linear's 16.9 / 19.1 / 29.6 / 36.0 / 41.1 / 47.8 / 67.8 / 103.5 / 329.7 at 1 / 2 / 4 / 8 / 16 / 32 / 64
// / 128 / 512 rows (the tile alone, warm: 193 GFLOP/s a core, MKL's square GEMM 186). At thousands of rows MKL
// leads (kernels/panels.py: why encoders keep their weights plain). Products of six rows or fewer take two panels
// at a time: two streams per thread read memory faster than one (the prototype at 1 / 2 / 4 rows, one run: 18.1 /
// 19.1 / 19.1 ms against 21.4 / 22.5 / 23.8 one panel at a time).
//
// The result is the float32 product to float32 rounding: each output's sum runs in k order on one FMA chain, from
// the bias (or zero). Only AVX-512 builds compute it; the formats pick panels nowhere else (kernels/panels.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#define ENERGON_PANELS 1
#endif

namespace {

constexpr int64_t PANEL = 32;        // output features per panel: two 512-bit vectors
constexpr int64_t MAX_TILE_ROWS = 12;  // 24 accumulators, 2 weight vectors and a broadcast: within 32 registers
constexpr int64_t ROW_BLOCK = 512;     // rows of x a thread runs through each of its panels before the next block
constexpr int64_t TWO_PANEL_ROWS = 6;  // products of up to this many rows take two panels per tile
// Each k asks for the weights PREFETCH_K rows ahead (2 KB): 8 and 32 measured 1-4 % slower at 1-32 rows.
constexpr int64_t PREFETCH_K = 16;

#ifdef ENERGON_PANELS
inline __mmask16 lane_mask(int64_t lanes) {
  return lanes >= 16 ? static_cast<__mmask16>(0xFFFF)
                     : lanes <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << lanes) - 1);
}

// y[m, 32j + c] = bias + sum_k x[m, k] * panel_j[k, c] for m < R, j < NP, c < cols (of the last panel; 32 before).
template <int R, int NP>
__attribute__((always_inline)) inline void tile(const float* x, int64_t K, const float* panel, const float* bias,
                                                float* y, int64_t ldy, int64_t cols) {
  const int64_t stride = K * PANEL;  // floats from one panel to the next
  __m512 acc[R][2 * NP];
  for (int j = 0; j < NP; ++j) {
    const int64_t c = j == NP - 1 ? cols : PANEL;
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(lane_mask(c), bias + j * PANEL) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_maskz_loadu_ps(lane_mask(c - 16), bias + j * PANEL + 16) : _mm512_setzero_ps();
    for (int m = 0; m < R; ++m) {
      acc[m][2 * j] = b0;
      acc[m][2 * j + 1] = b1;
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[2 * NP];
    for (int j = 0; j < NP; ++j) {
      const float* at = panel + j * stride + k * PANEL;
      w[2 * j] = _mm512_loadu_ps(at);
      w[2 * j + 1] = _mm512_loadu_ps(at + 16);
      // past the end of the panels at the last k's: a prefetch never faults (the address is formed as an integer)
      const uintptr_t ahead = reinterpret_cast<uintptr_t>(at) + PREFETCH_K * PANEL * sizeof(float);
      _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(ahead + 64), _MM_HINT_T0);
    }
    for (int m = 0; m < R; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * K + k]);
      for (int v = 0; v < 2 * NP; ++v) acc[m][v] = _mm512_fmadd_ps(w[v], xb, acc[m][v]);
    }
  }
  for (int j = 0; j < NP; ++j) {
    const int64_t c = j == NP - 1 ? cols : PANEL;
    for (int m = 0; m < R; ++m) {
      _mm512_mask_storeu_ps(y + m * ldy + j * PANEL, lane_mask(c), acc[m][2 * j]);
      _mm512_mask_storeu_ps(y + m * ldy + j * PANEL + 16, lane_mask(c - 16), acc[m][2 * j + 1]);
    }
  }
}

template <int NP>
void rows_tile(int64_t rows, const float* x, int64_t K, const float* panel, const float* bias, float* y, int64_t ldy,
               int64_t cols) {
  switch (rows) {
#define ENERGON_TILE(R) \
  case R:               \
    return tile<R, NP>(x, K, panel, bias, y, ldy, cols);
    ENERGON_TILE(1) ENERGON_TILE(2) ENERGON_TILE(3) ENERGON_TILE(4) ENERGON_TILE(5) ENERGON_TILE(6)
#undef ENERGON_TILE
  }
  if constexpr (NP == 1) {  // more registers than two panels of more rows would leave
    switch (rows) {
#define ENERGON_TILE(R) \
  case R:               \
    return tile<R, 1>(x, K, panel, bias, y, ldy, cols);
      ENERGON_TILE(7) ENERGON_TILE(8) ENERGON_TILE(9) ENERGON_TILE(10) ENERGON_TILE(11) ENERGON_TILE(12)
#undef ENERGON_TILE
    }
  }
  TORCH_CHECK(false, "panel_linear: a tile of ", rows, " rows");
}
#endif

// y = x @ W^T (+ bias), written into y [M, out_features] (contiguous float32).
void panel_linear_into(const at::Tensor& x, const at::Tensor& panels, int64_t out_features,
                       const c10::optional<at::Tensor>& bias, at::Tensor& y) {
#ifndef ENERGON_PANELS
  TORCH_CHECK(false, "panel_linear: built without AVX-512 (kernels/panels.available() is False here)");
#else
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "panel_linear: x must be contiguous 2-D float32");
  TORCH_CHECK(panels.dim() == 3 && panels.scalar_type() == at::kFloat && panels.is_contiguous() &&
                  panels.size(2) == PANEL && panels.size(1) == x.size(1),
              "panel_linear: panels must be contiguous float32 [P, in_features, 32], got ", panels.sizes());
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0), N = out_features;
  TORCH_CHECK(N > (P - 1) * PANEL && N <= P * PANEL, "panel_linear: ", P, " panels cannot hold ", N, " outputs");
  const float* b = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat && bias->is_contiguous(),
                "panel_linear: bias must be contiguous float32 [", N, "]");
    b = bias->data_ptr<float>();
  }
  TORCH_CHECK(y.dim() == 2 && y.size(0) == M && y.size(1) == N && y.scalar_type() == at::kFloat && y.is_contiguous(),
              "panel_linear: out must be contiguous float32 [", M, ", ", N, "]");
  if (M == 0) return;
  const float* xs = x.data_ptr<float>();
  const float* ws = panels.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  const int64_t np = M <= TWO_PANEL_ROWS ? 2 : 1;
  at::parallel_for(0, (P + np - 1) / np, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t block = 0; block < M; block += ROW_BLOCK) {
      const int64_t block_end = std::min(M, block + ROW_BLOCK);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t p = g * np, here = std::min(np, P - p);
        const int64_t cols = std::min(PANEL, N - (p + here - 1) * PANEL);  // of the last panel
        for (int64_t m = block; m < block_end;) {
          const int64_t left = block_end - m, tiles = (left + MAX_TILE_ROWS - 1) / MAX_TILE_ROWS;
          const int64_t rows = (left + tiles - 1) / tiles;  // tiles of equal size: 13 rows run as 7 + 6, not 12 + 1
          const float* xm = xs + m * K;
          float* ym = ys + m * N + p * PANEL;
          if (here == 2) {
            rows_tile<2>(rows, xm, K, ws + p * K * PANEL, b ? b + p * PANEL : nullptr, ym, N, cols);
          } else {
            rows_tile<1>(rows, xm, K, ws + p * K * PANEL, b ? b + p * PANEL : nullptr, ym, N, cols);
          }
          m += rows;
        }
      }
    }
  });
#endif
}

at::Tensor panel_linear(const at::Tensor& x, const at::Tensor& panels, int64_t out_features,
                        const c10::optional<at::Tensor>& bias) {
  at::Tensor y = at::empty({x.dim() == 2 ? x.size(0) : 0, out_features}, x.options());
  panel_linear_into(x, panels, out_features, bias, y);
  return y;
}

// The product into a caller's buffer (batch.StepBuffers: prompt-sized outputs reuse their pages).
void panel_linear_out(const at::Tensor& x, const at::Tensor& panels, int64_t out_features,
                      const c10::optional<at::Tensor>& bias, at::Tensor out) {
  panel_linear_into(x, panels, out_features, bias, out);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(energon_hf, m) {
  m.def("panel_linear(Tensor x, Tensor panels, int out_features, Tensor? bias=None) -> Tensor");
  m.def("panel_linear_out(Tensor x, Tensor panels, int out_features, Tensor? bias, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(energon_hf, CPU, m) {
  m.impl("panel_linear", &panel_linear);
  m.impl("panel_linear_out", &panel_linear_out);
}
