// Products of a few rows (decode steps: one token per running sequence) with weights that are read from memory
// once per step: x [M, K] (float32, or half precision widened to it) times W^T, W [N, K] held as float16,
// bfloat16, float32, int8 in groups of scales, or int4 nibbles with a float16 (scale, min) per group; the output
// in x's dtype. Each weight is decoded to float32 in registers
// and multiplied with float32 activations, accumulated in float32: the result is the float32 product with the
// stored weights, to float32 rounding, where torch's CPU kernels for int4, int8 and half weights round the
// activations to bfloat16 first (about 4e-3 relative error per product; on SmolLM2's 4-bit model that took
// free-running greedy agreement with float32 from 100 % to 72 %). Every decoded weight vector serves up to
// ROW_TILE rows of x.
//
// Each format's row_dot runs on 256-bit vectors (AVX2, FMA, F16C). Every format also takes four weight rows per
// call on 512-bit vectors where AVX-512 is compiled in (four_rows_dot). An earlier 512-bit row_dot had lost to
// the 256-bit one in place (an int4 product took 99 us after the step's glue against 54 us right after another
// product: the switch into AVX-512's frequency license); the four-row kernels win in place as well: SmolLM2's
// 4-bit model at batch 1, one process, generate calls alternating between the two builds, 72.1 against 66.0
// new tokens/s (2-core Xeon, 2026-12-07), its int4 products 58.6 against 76.9 us on average (torch.profiler).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "half.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ENERGON_VECTOR 1
#include <immintrin.h>
#if defined(__AVX512F__)
#define ENERGON_WIDE 1
#endif
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace {

constexpr int ROW_TILE = 4;
constexpr int64_t WEIGHT_BLOCK = 16;
// Each row asks for the row PREFETCH_ROWS ahead: the weights arrive cold (a step streams them once), and the
// hardware prefetcher alone left an int4 product at 118 us against 64 warm (SmolLM2, one thread; 82 with this).
constexpr int64_t PREFETCH_ROWS = 8;
// four_rows_dot keeps its rows' (scale, min) pairs on the stack: up to this many groups per row (K = 8192 at
// groups of 32; longer rows run row_dot).
constexpr int64_t MAX_WIDE_GROUPS = 256;

inline float half_to_float(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

inline float bfloat16_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

#ifdef ENERGON_VECTOR
// Prefetching past the end of a tensor is harmless: a prefetch never faults.
inline void prefetch(const void* start, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(static_cast<const char*>(start) + b, _MM_HINT_T0);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 8 bytes -> 8 int32 lanes
inline __m256i bytes_u8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 bytes_s8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// out[t] = the 8 lanes of sum over k in [begin, end) (a multiple of 32 long) of load(k) * x_t[k], summed on four
// chains; `load(k)` gives the 8 weights from k as float32.
template <int T, class Load>
__attribute__((always_inline)) inline void four_chain_dot(Load load, int64_t begin, int64_t end, const float* x,
                                                          int64_t ldx, __m256* out) {
  __m256 part[4][T];
  for (int c = 0; c < 4; ++c)
    for (int t = 0; t < T; ++t) part[c][t] = _mm256_setzero_ps();
  for (int64_t k = begin; k < end; k += 32) {
    const __m256 w0 = load(k), w1 = load(k + 8), w2 = load(k + 16), w3 = load(k + 24);
    for (int t = 0; t < T; ++t) {
      const float* xs = x + t * ldx + k;
      part[0][t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xs), part[0][t]);
      part[1][t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xs + 8), part[1][t]);
      part[2][t] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xs + 16), part[2][t]);
      part[3][t] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xs + 24), part[3][t]);
    }
  }
  for (int t = 0; t < T; ++t)
    out[t] = _mm256_add_ps(_mm256_add_ps(part[0][t], part[1][t]), _mm256_add_ps(part[2][t], part[3][t]));
}
#endif

#ifdef ENERGON_WIDE
// The four-row kernels' accumulators: 16 lanes per (weight row r, x row t), zeroed; store() writes each one's sum
// to out[t * 4 + r].
template <int T>
struct FourRowSums {
  __m512 sums[4][T];
  FourRowSums() {
    for (int r = 0; r < 4; ++r)
      for (int t = 0; t < T; ++t) sums[r][t] = _mm512_setzero_ps();
  }
  void store(float* out) const {
    for (int t = 0; t < T; ++t)
      for (int r = 0; r < 4; ++r) out[4 * t + r] = _mm512_reduce_add_ps(sums[r][t]);
  }
};
#endif

// The portable loop every format falls back on (no AVX2, or shapes the vector steps do not divide):
// out[t] = sum over groups g of scale(g) * (sum_i value(g, i) * x_t[g * group + i]) + offset(g) * xsum(t, g).
template <int T, class Value, class Scale, class Offset, class XSum>
void portable_dot(int64_t groups, int64_t group, const float* x, int64_t ldx, Value value, Scale scale,
                  Offset offset, XSum xsum, float* out) {
  for (int t = 0; t < T; ++t) {
    float sum = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      float part = 0.f;
      for (int64_t i = 0; i < group; ++i) part += value(g, i) * x[t * ldx + g * group + i];
      sum += part * scale(g) + offset(g) * xsum(t, g);
    }
    out[t] = sum;
  }
}

// One weight format: `row_dot<T>(n, x, ldx, xrow, out)` writes out[t] = sum_k W[n, k] * x[t * ldx + k] for t < T
// (x: rows xrow .. xrow + T of the input). Several accumulator chains per row, so a one-row product is not
// bound by the latency of one chain of FMAs.

struct Int4Rows {
  const uint8_t* nibbles;  // [N, K / 2]: byte i of a group: element i (low half), element i + group / 2 (high)
  const uint16_t* table;   // [N, K / group, 2] float16: w = q * scale + min
  const float* xsum;       // [M, K / group]: each group's sum of x, for the min term
  int64_t K, group, groups;

#ifdef ENERGON_VECTOR
  // acc[t] += scale * (x_t . q) over group g. HALF: half the group size, a constant for the usual groups of 32.
  template <int T, int64_t HALF>
  __attribute__((always_inline)) inline void group_dot(const uint8_t* q, float scale, int64_t g, const float* x,
                                                       int64_t ldx, __m256* acc) const {
    const int64_t half = HALF > 0 ? HALF : group / 2;
    __m256 part[T];
    for (int t = 0; t < T; ++t) part[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < half; i += 8) {
      const __m256i bytes = bytes_u8(q + g * half + i);
      const __m256 low = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, _mm256_set1_epi32(15)));
      const __m256 high = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
      const float* xs = x + g * group + i;
      for (int t = 0; t < T; ++t) {
        part[t] = _mm256_fmadd_ps(low, _mm256_loadu_ps(xs + t * ldx), part[t]);
        part[t] = _mm256_fmadd_ps(high, _mm256_loadu_ps(xs + t * ldx + half), part[t]);
      }
    }
    const __m256 s = _mm256_set1_ps(scale);
    for (int t = 0; t < T; ++t) acc[t] = _mm256_fmadd_ps(part[t], s, acc[t]);
  }

  template <int T, int64_t HALF>
  __attribute__((always_inline)) inline void groups_dot(const uint8_t* q, const float* pairs, const float* x,
                                                        int64_t ldx, __m256* even, __m256* odd) const {
    int64_t g = 0;
    for (; g + 1 < groups; g += 2) {
      group_dot<T, HALF>(q, pairs[2 * g], g, x, ldx, even);
      group_dot<T, HALF>(q, pairs[2 * g + 2], g + 1, x, ldx, odd);
    }
    if (g < groups) group_dot<T, HALF>(q, pairs[2 * g], g, x, ldx, even);
  }
#endif

#ifdef ENERGON_WIDE
  // acc[r][t] += row r's group products with x_t, over every group. HALF: half the group size, a constant for
  // groups of 32 (0: read `group`).
  template <int T, int64_t HALF>
  __attribute__((always_inline)) inline void wide_groups(const uint8_t* q, const float* pairs, const float* x,
                                                         int64_t ldx, __m512 (*acc)[T]) const {
    const int64_t half = HALF > 0 ? HALF : group / 2, bytes = K / 2;
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t i = 0; i < half; i += 16) {  // 16 bytes of a row: elements i .. i + 16 and half + i ..
        __m512 xs[T][2];
        for (int t = 0; t < T; ++t) {
          xs[t][0] = _mm512_loadu_ps(x + t * ldx + g * 2 * half + i);
          xs[t][1] = _mm512_loadu_ps(x + t * ldx + g * 2 * half + half + i);
        }
        for (int r = 0; r < 4; ++r) {
          const float* pair = pairs + 2 * (r * groups + g);
          const __m512 values = _mm512_fmadd_ps(iota, _mm512_set1_ps(pair[0]), _mm512_set1_ps(pair[1]));
          const __m512i idx = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + r * bytes + g * half + i)));
          const __m512 low = _mm512_permutexvar_ps(idx, values);
          const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(idx, 4), values);
          for (int t = 0; t < T; ++t) {
            acc[r][t] = _mm512_fmadd_ps(low, xs[t][0], acc[r][t]);
            acc[r][t] = _mm512_fmadd_ps(high, xs[t][1], acc[r][t]);
          }
        }
      }
    }
  }
#endif

  // out[t * 4 + r] for weight rows n .. n + 4 (false: not offered, row_dot runs). Each (row, group) becomes a
  // table of its 16 values, scale * q + min, and the nibbles index it (vpermps reads an index's low 4 bits), so
  // a weight costs a fraction of a lookup instead of a mask, a conversion and a min term; four rows share the
  // loads of x and the row overhead. SmolLM2's gate/up matrix (3072 x 576), one thread, warm: 97 us against 192
  // for row_dot; 30 layers' products, cold, 2 threads: 5.0 against 7.4 ms.
  template <int T>
  bool four_rows_dot(int64_t n, const float* x, int64_t ldx, int64_t, float* out) const {
#ifdef ENERGON_WIDE
    if (group % 32 != 0 || groups > MAX_WIDE_GROUPS) return false;
    const int64_t bytes = K / 2;
    const uint8_t* q = nibbles + n * bytes;
    const uint16_t* row_table = table + n * groups * 2;  // the four rows' tables are contiguous
    prefetch(q + PREFETCH_ROWS * bytes, 4 * bytes);
    prefetch(row_table + PREFETCH_ROWS * groups * 2, 4 * groups * 4);
    float pairs[4 * 2 * MAX_WIDE_GROUPS];
    to_float_pairs(row_table, 4 * groups, pairs);
    FourRowSums<T> acc;
    if (group == 32)
      wide_groups<T, 16>(q, pairs, x, ldx, acc.sums);
    else
      wide_groups<T, 0>(q, pairs, x, ldx, acc.sums);
    acc.store(out);
    return true;
#else
    return false;
#endif
  }

  template <int T>
  void row_dot(int64_t n, const float* x, int64_t ldx, int64_t xrow, float* out) const {
    const uint8_t* q = nibbles + n * (K / 2);
    const uint16_t* row_table = table + n * groups * 2;
    const int64_t half = group / 2;
#ifdef ENERGON_VECTOR
    if (half % 8 == 0) {
      prefetch(q + PREFETCH_ROWS * (K / 2), K / 2);
      prefetch(row_table + PREFETCH_ROWS * groups * 2, groups * 4);
      const float* pairs = float_pairs(row_table, groups);
      __m256 even[T], odd[T];  // two chains: even and odd groups
      for (int t = 0; t < T; ++t) even[t] = odd[t] = _mm256_setzero_ps();
      if (half == 16)
        groups_dot<T, 16>(q, pairs, x, ldx, even, odd);
      else
        groups_dot<T, 0>(q, pairs, x, ldx, even, odd);
      for (int t = 0; t < T; ++t) {
        float mins = 0.f;
        for (int64_t j = 0; j < groups; ++j) mins += pairs[2 * j + 1] * xsum[(xrow + t) * groups + j];
        out[t] = hsum(_mm256_add_ps(even[t], odd[t])) + mins;
      }
      return;
    }
#endif
    portable_dot<T>(
        groups, group, x, ldx,
        [&](int64_t g, int64_t i) {
          const uint8_t byte = q[g * half + (i < half ? i : i - half)];
          return static_cast<float>(i < half ? byte & 15 : byte >> 4);
        },
        [&](int64_t g) { return half_to_float(row_table[2 * g]); },
        [&](int64_t g) { return half_to_float(row_table[2 * g + 1]); },
        [&](int t, int64_t g) { return xsum[(xrow + t) * groups + g]; }, out);
  }

#ifdef ENERGON_VECTOR
  // The (scale, min) pairs of `count` groups in float32 (converted 8 at a time rather than two per group), into
  // `pairs`, or into the thread's scratch.
  static void to_float_pairs(const uint16_t* halves, int64_t count, float* pairs) {
    energon_hf::to_float(reinterpret_cast<const c10::Half*>(halves), pairs, 2 * count);
  }

  static const float* float_pairs(const uint16_t* halves, int64_t count) {
    thread_local std::vector<float> pairs;
    pairs.resize(2 * count);
    to_float_pairs(halves, count, pairs.data());
    return pairs.data();
  }
#endif
};

struct Int8Rows {
  const int8_t* q;     // [N, K]
  const float* scale;  // [N, K / group]: w = q * scale
  int64_t K, group, groups;

  // out[t * 4 + r] for weight rows n .. n + 4 (false: not offered): each 16 weights widened, scaled and
  // multiplied on 512-bit vectors, four rows sharing the loads of x. At one row of x the product is bound by
  // memory either way (the embedded SmolLM2's Q8_0 head, 49152 x 576, 2 threads: 1.2 ms warm, 1.8-2.2 cold, both
  // kernels); at four rows the head takes 1.70 against 2.25 ms warm, SmolLM2's 30 layers' products at 8 rows
  // 20.7 against 24.9 ms cold.
  template <int T>
  bool four_rows_dot(int64_t n, const float* x, int64_t ldx, int64_t, float* out) const {
#ifdef ENERGON_WIDE
    if (group % 16 != 0) return false;
    const int8_t* w = q + n * K;
    const float* scales = scale + n * groups;
    prefetch(w + PREFETCH_ROWS * K, 4 * K);
    prefetch(scales + PREFETCH_ROWS * groups, 4 * groups * 4);
    FourRowSums<T> acc;
    for (int64_t k = 0; k < K; k += 16) {
      __m512 xs[T];
      for (int t = 0; t < T; ++t) xs[t] = _mm512_loadu_ps(x + t * ldx + k);
      for (int r = 0; r < 4; ++r) {
        const __m512 weights = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k)))),
            _mm512_set1_ps(scales[r * groups + k / group]));
        for (int t = 0; t < T; ++t) acc.sums[r][t] = _mm512_fmadd_ps(weights, xs[t], acc.sums[r][t]);
      }
    }
    acc.store(out);
    return true;
#else
    return false;
#endif
  }

#ifdef ENERGON_VECTOR
  // acc[t] += scale * (x_t . q[k, k + 32)): GGUF's Q8_0 block, its scale applied once to the block's sum (scaling
  // each weight cost a multiply per 8 of them: the embedded SmolLM2's 8-bit head, cold, 2.6 ms a step before).
  template <int T>
  __attribute__((always_inline)) static inline void block_dot(const int8_t* w, float scale, int64_t k, const float* x,
                                                              int64_t ldx, __m256* acc) {
    __m256 part[T];
    for (int t = 0; t < T; ++t) part[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < 32; i += 8) {
      const __m256 weights = bytes_s8(w + k + i);
      for (int t = 0; t < T; ++t) part[t] = _mm256_fmadd_ps(weights, _mm256_loadu_ps(x + t * ldx + k + i), part[t]);
    }
    const __m256 s = _mm256_set1_ps(scale);
    for (int t = 0; t < T; ++t) acc[t] = _mm256_fmadd_ps(part[t], s, acc[t]);
  }
#endif

  template <int T>
  void row_dot(int64_t n, const float* x, int64_t ldx, int64_t, float* out) const {
    const int8_t* w = q + n * K;
    const float* scales = scale + n * groups;
#ifdef ENERGON_VECTOR
    prefetch(w + PREFETCH_ROWS * K, K);
    prefetch(scales + PREFETCH_ROWS * groups, groups * 4);
    if (group == 32) {  // even and odd blocks on two chains
      __m256 even[T], odd[T];
      for (int t = 0; t < T; ++t) even[t] = odd[t] = _mm256_setzero_ps();
      int64_t g = 0;
      for (; g + 1 < groups; g += 2) {
        block_dot<T>(w, scales[g], g * 32, x, ldx, even);
        block_dot<T>(w, scales[g + 1], g * 32 + 32, x, ldx, odd);
      }
      if (g < groups) block_dot<T>(w, scales[g], g * 32, x, ldx, even);
      for (int t = 0; t < T; ++t) out[t] = hsum(_mm256_add_ps(even[t], odd[t]));
      return;
    }
    if (group % 32 == 0) {  // long groups (per-channel scales: one group): four chains within a group
      __m256 acc[T], sum[T];
      for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
      const auto load = [&](int64_t k) { return bytes_s8(w + k); };
      for (int64_t g = 0; g < groups; ++g) {
        four_chain_dot<T>(load, g * group, (g + 1) * group, x, ldx, sum);
        const __m256 s = _mm256_set1_ps(scales[g]);
        for (int t = 0; t < T; ++t) acc[t] = _mm256_fmadd_ps(sum[t], s, acc[t]);
      }
      for (int t = 0; t < T; ++t) out[t] = hsum(acc[t]);
      return;
    }
#endif
    portable_dot<T>(
        groups, group, x, ldx, [&](int64_t g, int64_t i) { return static_cast<float>(w[g * group + i]); },
        [&](int64_t g) { return scales[g]; }, [](int64_t) { return 0.f; }, [](int, int64_t) { return 0.f; }, out);
  }
};

// Float weights: float32, float16 or bfloat16 (`kind`: 0, 1, 2). Only float16 is dispatched to (formats.DenseWeight).
// SmolLM2 at batch 1 (one process, alternating, 2026-12-07): float32 through this kernel 35.9 against F.linear's
// 37.5 new tokens/s; bfloat16 58.0 against oneDNN's packed 51.7, but 31.2 against 41.9 at batch 8, and the packed
// weight serves many rows: taking this kernel for one row would hold bfloat16 weights twice.
struct FloatRows {
  const void* weight;  // [N, K]
  int kind;
  int64_t K;

  // out[t * 4 + r] for weight rows n .. n + 4 (false: not offered): each 16 weights widened on 512-bit vectors,
  // four rows sharing the loads of x, as the quantized formats' kernels. SmolLM2 in float16 at batch 1, one
  // process, alternating: 53.7 against 46.5 new tokens/s for row_dot alone (2-core Xeon, 2026-12-07). The loop
  // repeats Int8Rows' on purpose: one helper taking the weights' load as a lambda (per element type) made
  // SmolLM2's 121 float16 products 17.1-20.5 against 14.5-16.3 ms and its int8 ones 8.6-9.7 against 8.0-8.7.
  template <int T>
  bool four_rows_dot(int64_t n, const float* x, int64_t ldx, int64_t, float* out) const {
#ifdef ENERGON_WIDE
    if (K % 16 != 0) return false;
    const int64_t item = kind == 0 ? 4 : 2;
    const auto* w = static_cast<const char*>(weight) + n * K * item;
    prefetch(w + PREFETCH_ROWS * K * item, 4 * K * item);
    FourRowSums<T> acc;
    for (int64_t k = 0; k < K; k += 16) {
      __m512 xs[T];
      for (int t = 0; t < T; ++t) xs[t] = _mm512_loadu_ps(x + t * ldx + k);
      for (int r = 0; r < 4; ++r) {
        const char* p = w + (r * K + k) * item;
        __m512 weights;
        if (kind == 0) {
          weights = _mm512_loadu_ps(reinterpret_cast<const float*>(p));
        } else {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
          weights = kind == 1 ? _mm512_cvtph_ps(raw)
                              : _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
        }
        for (int t = 0; t < T; ++t) acc.sums[r][t] = _mm512_fmadd_ps(weights, xs[t], acc.sums[r][t]);
      }
    }
    acc.store(out);
    return true;
#else
    return false;
#endif
  }

#ifdef ENERGON_VECTOR
  inline __m256 load(int64_t offset) const {
    if (kind == 0) return _mm256_loadu_ps(static_cast<const float*>(weight) + offset);
    const auto* halves = static_cast<const uint16_t*>(weight) + offset;
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(halves));
    if (kind == 1) return _mm256_cvtph_ps(raw);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
#endif

  inline float scalar(int64_t offset) const {
    if (kind == 0) return static_cast<const float*>(weight)[offset];
    const uint16_t bits = static_cast<const uint16_t*>(weight)[offset];
    return kind == 1 ? half_to_float(bits) : bfloat16_to_float(bits);
  }

  template <int T>
  void row_dot(int64_t n, const float* x, int64_t ldx, int64_t, float* out) const {
    const int64_t row = n * K;
#ifdef ENERGON_VECTOR
    const int64_t bytes = K * (kind == 0 ? 4 : 2);
    prefetch(static_cast<const char*>(weight) + (n + PREFETCH_ROWS) * bytes, bytes);
    if (K % 32 == 0) {
      __m256 sum[T];
      four_chain_dot<T>([&](int64_t k) { return load(row + k); }, 0, K, x, ldx, sum);
      for (int t = 0; t < T; ++t) out[t] = hsum(sum[t]);
      return;
    }
#endif
    portable_dot<T>(
        1, K, x, ldx, [&](int64_t, int64_t i) { return scalar(row + i); }, [](int64_t) { return 1.f; },
        [](int64_t) { return 0.f; }, [](int, int64_t) { return 0.f; }, out);
  }
};

// Activations that underflow to subnormals (SiLU of a very negative gate: about -1e-42) make every FMA that
// reads them take a microcode assist on x86: a SmolLM2 down projection ran 2x slower. Within our loops they
// count as zero (torch's bfloat16 kernels flush them too); the thread's previous mode is restored after.
struct DenormalsAreZero {
#if defined(__SSE__)
  const unsigned int saved = _mm_getcsr();
  DenormalsAreZero() { _mm_setcsr(saved | 0x8040); }  // DAZ (bit 6) and FTZ (bit 15)
  ~DenormalsAreZero() { _mm_setcsr(saved); }
#endif
};

// The weight rows [block, stop) against one tile of T rows of x: four rows per call where the format offers it
// (four_rows_dot), one at a time otherwise and for the rows left over.
template <int T, class Rows>
inline void tile_rows(const Rows& rows, int64_t block, int64_t stop, const float* xs, int64_t K, int64_t m,
                      int64_t N, float* op) {
  float result[T * 4];
  for (int64_t n = block; n < stop;) {
    if (n + 4 <= stop && rows.template four_rows_dot<T>(n, xs, K, m, result)) {
      for (int t = 0; t < T; ++t) std::memcpy(op + (m + t) * N + n, result + 4 * t, 4 * sizeof(float));
      n += 4;
    } else {
      rows.template row_dot<T>(n, xs, K, m, result);
      for (int t = 0; t < T; ++t) op[(m + t) * N + n] = result[t];
      n += 1;
    }
  }
}

// out [M, N] = x [M, K] @ W^T, rows of W split over torch's threads, x's rows in tiles of ROW_TILE.
template <class Rows>
at::Tensor run_rows(const Rows& rows, const at::Tensor& x, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, WEIGHT_BLOCK, [&](int64_t begin, int64_t end) {
    const DenormalsAreZero daz;
    // Weight rows in blocks that stay in L1 while every tile of x passes over them: x streams once per block,
    // not once per weight row (a 49152-row head over 2048 rows of x would otherwise read x 49152 times).
    for (int64_t block = begin; block < end; block += WEIGHT_BLOCK) {
      const int64_t stop = std::min(block + WEIGHT_BLOCK, end);
      for (int64_t m = 0; m < M; m += ROW_TILE) {
        const float* xs = xp + m * K;
        switch (std::min<int64_t>(ROW_TILE, M - m)) {
          case 1: tile_rows<1>(rows, block, stop, xs, K, m, N, op); break;
          case 2: tile_rows<2>(rows, block, stop, xs, K, m, N, op); break;
          case 3: tile_rows<3>(rows, block, stop, xs, K, m, N, op); break;
          default: tile_rows<4>(rows, block, stop, xs, K, m, N, op); break;
        }
      }
    }
  });
  return out;
}

// x [rows, in] in float32 for the kernels: as given, or widened from float16 / bfloat16 here (a decode step's few
// rows). The casts in and out (in_dtype_of) stay in C++, where callers had made them two more Python-level torch
// ops per product (240 in a half-precision SmolLM2 step).
at::Tensor widened_input(const at::Tensor& x, int64_t K, const char* op) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) && x.dim() == 2 &&
                  x.is_contiguous(),
              op, ": x must be a contiguous [rows, in] float32, float16 or bfloat16 tensor");
  TORCH_CHECK(x.size(1) == K, op, ": x has ", x.size(1), " input features, the weight ", K);
  return dtype == at::kFloat ? x : x.to(at::kFloat);
}

// The float32 product in x's dtype (rounded to nearest even, as torch's cast).
at::Tensor in_dtype_of(const at::Tensor& x, const at::Tensor& out) {
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& nibbles, const at::Tensor& dm, int64_t group) {
  TORCH_CHECK(nibbles.scalar_type() == at::kByte && nibbles.dim() == 2 && nibbles.is_contiguous(),
              "int4_gemv: nibbles must be a contiguous [out, in / 2] uint8 tensor");
  const int64_t N = nibbles.size(0), K = nibbles.size(1) * 2;
  TORCH_CHECK(group > 0 && group % 2 == 0 && K % group == 0, "int4_gemv: ", K, " input features, group ", group);
  const int64_t groups = K / group;
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.sizes() == at::IntArrayRef({N, groups, 2}),
              "int4_gemv: dm must be a contiguous [out, in / group, 2] float16 tensor");
  const at::Tensor xf = widened_input(x, K, "int4_gemv");
  std::vector<float> xsum(x.size(0) * groups);  // each group's sum of x, for the min term
  const float* xp = xf.data_ptr<float>();
  for (int64_t i = 0; i < static_cast<int64_t>(xsum.size()); ++i) {
    float sum = 0.f;
    for (int64_t k = 0; k < group; ++k) sum += xp[i * group + k];
    xsum[i] = sum;
  }
  Int4Rows rows{nibbles.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(dm.data_ptr<at::Half>()),
                xsum.data(), K, group, groups};
  return in_dtype_of(x, run_rows(rows, xf, N));
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(q.scalar_type() == at::kChar && q.dim() == 2 && q.is_contiguous(),
              "int8_gemv: q must be a contiguous [out, in] int8 tensor");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 && scale.size(0) == N &&
                  scale.size(1) > 0 && K % scale.size(1) == 0,
              "int8_gemv: scale must be a contiguous [out, groups] float32 tensor that divides ", K, " features");
  const at::Tensor xf = widened_input(x, K, "int8_gemv");
  const int64_t groups = scale.size(1);
  Int8Rows rows{q.data_ptr<int8_t>(), scale.data_ptr<float>(), K, K / groups, groups};
  return in_dtype_of(x, run_rows(rows, xf, N));
}

at::Tensor float_gemv(const at::Tensor& x, const at::Tensor& weight) {
  const auto dtype = weight.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) && weight.dim() == 2 &&
                  weight.is_contiguous(),
              "float_gemv: weight must be a contiguous [out, in] float32, float16 or bfloat16 tensor");
  const at::Tensor xf = widened_input(x, weight.size(1), "float_gemv");
  FloatRows rows{weight.data_ptr(), dtype == at::kFloat ? 0 : dtype == at::kHalf ? 1 : 2, weight.size(1)};
  return in_dtype_of(x, run_rows(rows, xf, weight.size(0)));
}

bool gemv_vectorized() {
#ifdef ENERGON_VECTOR
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(energon_hf, m) {
  m.def("gemv_vectorized() -> bool");
  m.def("int4_gemv(Tensor x, Tensor nibbles, Tensor dm, int group) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("float_gemv(Tensor x, Tensor weight) -> Tensor");
}

// No tensor argument to dispatch on: registered for every backend.
TORCH_LIBRARY_IMPL(energon_hf, CompositeExplicitAutograd, m) { m.impl("gemv_vectorized", &gemv_vectorized); }

TORCH_LIBRARY_IMPL(energon_hf, CPU, m) {
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int8_gemv", &int8_gemv);
  m.impl("float_gemv", &float_gemv);
}
