// Decode attention on CPU that reads the paged KV cache in place: one query token per sequence, every query head
// of a key/value head together. No block is gathered and nothing is padded or masked. Caches in float32, bfloat16
// or float16 (q and the output in the cache's dtype): keys and values are widened to float32 as they are loaded,
// scores, softmax and sums are float32, and with a half-precision cache the softmax weights are rounded to it
// before they weigh the values, as SDPA's CPU kernel rounds them for its second product (its sum of the weights
// stays float32, as here), so the two agree to float32 summation order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "half.h"
#include "vector_math.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using energon_hf::from_float;
using energon_hf::round_to;
#if defined(__AVX512F__)
using energon_hf::load16;
#endif

struct Shape {
  int64_t batch, q_heads, kv_heads, head_dim, block_size, max_blocks;
};

constexpr int64_t kMaxGroup = 8;  // query heads per key/value head that the vector path keeps in registers
constexpr int64_t PREFETCH_BLOCKS = 2;  // blocks ahead (prefetch_head)

// The portable loops: any head size, any group (a single 64-wide dot is a chain of dependent FMAs, hence slower).
template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += q[i] * static_cast<float>(k[i]);
  return sum;
}

template <typename T>
inline void add_scaled(float* acc, float p, const T* v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += p * static_cast<float>(v[i]);
}

#if defined(__AVX512F__)
// out[i] = the sum of v[i]'s 16 lanes: a transpose tree, 45 instructions for 16 sums where _mm512_reduce_add_ps
// takes about 8 for each.
inline __m512 sum16(const __m512* v) {
  __m512 pairs[8], quads[4], halves[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: v[2i]'s two partial sums at 0 and 2, v[2i+1]'s at 1 and 3
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: the lane's sums of v[4i .. 4i+3]
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // lanes: v[8i .. 8i+3] over lanes 0-1, over 2-3, then v[8i+4 ..] the same
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(halves[0], halves[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// The dot products of `n` (at most 16) keys, `stride` floats apart, with each of the group's query heads: 16
// independent sums per head (the FMA units stay busy), reduced together by sum16. Head sizes that are multiples
// of 16.
template <int N, typename T>
inline void tile_scores(const float* query, const T* keys, int64_t stride, int64_t group, int64_t d, float* out,
                        int64_t out_stride) {
  for (int64_t g = 0; g < group; ++g) {
    __m512 acc[16];
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
      const __m512 q = _mm512_loadu_ps(query + g * d + i);
      for (int j = 0; j < N; ++j) acc[j] = _mm512_fmadd_ps(q, load16(keys + j * stride + i), acc[j]);
    }
    _mm512_mask_storeu_ps(out + g * out_stride, static_cast<__mmask16>((1u << N) - 1), sum16(acc));
  }
}

template <typename T, int... N>
inline void tile_scores_n(int64_t n, const float* query, const T* keys, int64_t stride, int64_t group,
                          int64_t d, float* out, int64_t out_stride, std::integer_sequence<int, N...>) {
  ((n == N + 1 ? tile_scores<N + 1>(query, keys, stride, group, d, out, out_stride) : void()), ...);
}

// acc[g * d + i] += sum over a run's n slots j of weights[g * stride + j] * value_j[i], for the V vectors of
// features from acc and values on: the group's accumulators stay in registers over the run (one load and store of
// them per run, not per slot).
template <int G, int V, typename T>
inline void run_values_chunk(const float* weights, int64_t stride, const T* values, int64_t slot_stride,
                             int64_t n, int64_t d, float* acc) {
  __m512 a[G][V];
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < V; ++v) a[g][v] = _mm512_loadu_ps(acc + g * d + v * 16);
  for (int64_t j = 0; j < n; ++j) {
    __m512 x[V];
    for (int v = 0; v < V; ++v) x[v] = load16(values + j * slot_stride + v * 16);
    for (int g = 0; g < G; ++g) {
      const __m512 w = _mm512_set1_ps(weights[g * stride + j]);
      for (int v = 0; v < V; ++v) a[g][v] = _mm512_fmadd_ps(w, x[v], a[g][v]);
    }
  }
  for (int g = 0; g < G; ++g)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc + g * d + v * 16, a[g][v]);
}

template <int G, typename T>
inline void run_values(const float* weights, int64_t stride, const T* values, int64_t slot_stride, int64_t n,
                       int64_t d, float* acc) {
  constexpr int V = G <= 6 ? 4 : 2;  // G x V accumulators, V values and a weight within the 32 vector registers
  int64_t i = 0;
  for (; i + 16 * V <= d; i += 16 * V)
    run_values_chunk<G, V>(weights, stride, values + i, slot_stride, n, d, acc + i);
  for (; i < d; i += 16) run_values_chunk<G, 1>(weights, stride, values + i, slot_stride, n, d, acc + i);
}

template <typename T, int... G>
inline void run_values_n(int64_t group, const float* weights, int64_t stride, const T* values,
                         int64_t slot_stride, int64_t n, int64_t d, float* acc, std::integer_sequence<int, G...>) {
  ((group == G + 1 ? run_values<G + 1>(weights, stride, values, slot_stride, n, d, acc) : void()), ...);
}
#endif

// Ask for the vectors of this head PREFETCH_BLOCKS blocks ahead while this block's are worked on: blocks lie
// anywhere in the cache, and the hardware prefetcher does not follow a block table. bench/cpu_attention.py's
// step (SmolLM2's 30 layers, 64 sequences, cold caches; 2-core Xeon, interleaved A/B): 1.13x faster than before
// with the tiled scores alone, 1.41x with prefetching (one block ahead and two measured alike; four no better),
// 1.51x (41.6 against 62.8 ms, 11 GB/s) with the values' accumulators in registers too; then the softmax's exp
// on 8 lanes (vector_math.h; it was glibc's scalar expf) another 1.66x (30.5 against 50.7 ms, 15 GB/s).
template <typename T>
inline void prefetch_head(const T* first, int64_t slots, const Shape& s) {
  constexpr int64_t line = 64 / sizeof(T);  // elements per cache line
  for (int64_t j = 0; j < slots; ++j)
    for (int64_t i = 0; i < s.head_dim; i += line) __builtin_prefetch(first + j * s.kv_heads * s.head_dim + i);
}

// fn(t, n, first, stride) for the runs of n consecutive slots (tokens t .. t + n - 1) of a sequence's tokens
// begin .. len - 1, at most `most` long, walking its block table: the one place that knows the cache's layout
// [blocks, block_size, kv_heads, head_dim]. `first` is token t's vector of that head, the next ones `stride`
// elements apart.
template <typename T, typename Fn>
inline void for_each_run(const T* cache, const int64_t* table, int64_t begin, int64_t len, const Shape& s,
                         int64_t kv_head, int64_t most, Fn&& fn) {
  const int64_t slot_stride = s.kv_heads * s.head_dim, block_stride = s.block_size * slot_stride;
  const int64_t first_block = begin / s.block_size;
  for (int64_t blk = first_block, start = blk * s.block_size; start < len; start += s.block_size, ++blk) {
    const T* slots = cache + table[blk] * block_stride + kv_head * s.head_dim;
    const int64_t from = std::max(begin, start) - start, n = std::min(s.block_size, len - start);
    for (int64_t ahead = blk == first_block ? 1 : PREFETCH_BLOCKS; ahead <= PREFETCH_BLOCKS; ++ahead) {
      const int64_t next = start + ahead * s.block_size;
      if (next < len)
        prefetch_head(cache + table[blk + ahead] * block_stride + kv_head * s.head_dim,
                      std::min(s.block_size, len - next), s);
    }
    for (int64_t j = from; j < n; j += most)
      fn(start + j, std::min(most, n - j), slots + j * slot_stride, slot_stride);
  }
}

template <typename T, typename Fn>
inline void for_each_slot(const T* cache, const int64_t* table, int64_t begin, int64_t len, const Shape& s,
                          int64_t kv_head, Fn&& fn) {
  for_each_run(cache, table, begin, len, s, kv_head, 1,
               [&](int64_t t, int64_t, const T* slot, int64_t) { fn(t, slot); });
}

// cap * tanh(x / cap) over a row of scores, as transformers' Gemma 2 caps its attention logits: tanh from exp of
// -2|x / cap| (no cancellation for large |x|; for small ones an absolute error of about 1e-7 x cap).
inline void soft_cap(float* row, int64_t n, float cap) {
  int64_t t = 0;
#if defined(__AVX512F__)
  const __m512 inverse = _mm512_set1_ps(1.f / cap), scale = _mm512_set1_ps(cap), one = _mm512_set1_ps(1.f);
  for (; t + 16 <= n; t += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(row + t), inverse);
    const __m512 e = energon_hf::exp16(_mm512_mul_ps(_mm512_set1_ps(-2.f), _mm512_abs_ps(x)));
    const __m512 magnitude = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    const __m512 signed_tanh = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(magnitude),
        _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(0x80000000u)))));
    _mm512_storeu_ps(row + t, _mm512_mul_ps(signed_tanh, scale));
  }
#endif
  for (; t < n; ++t) row[t] = cap * std::tanh(row[t] / cap);
}

// One (sequence, key/value head) pair: its `group` query heads against the sequence's keys from `begin` on (a
// sliding window's first key), block by block; the scores of all those keys (soft-capped when `cap` > 0), one
// softmax, then the weighted sum of the values.
template <typename T>
void attend_one(const T* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t begin, int64_t len,
                T* out, const Shape& s, int64_t kv_head, float scale, float cap, std::vector<float>& query,
                std::vector<float>& scores, std::vector<float>& acc, std::vector<T>& scratch) {
  const int64_t group = s.q_heads / s.kv_heads, d = s.head_dim, count = len - begin;
  [[maybe_unused]] const bool vector_path = d % 16 == 0 && group <= kMaxGroup;
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < d; ++i) query[g * d + i] = static_cast<float>(q[(kv_head * group + g) * d + i]) * scale;
  scores.resize(group * count);
#if defined(__AVX512F__)
  if (vector_path) {
    for_each_run(k_cache, table, begin, len, s, kv_head, 16, [&](int64_t t, int64_t n, const T* keys,
                                                                   int64_t stride) {
      tile_scores_n(n, query.data(), keys, stride, group, d, &scores[t - begin], count,
                    std::make_integer_sequence<int, 16>{});
    });
  } else
#endif
  {
    for_each_slot(k_cache, table, begin, len, s, kv_head, [&](int64_t t, const T* key) {
      for (int64_t g = 0; g < group; ++g) scores[g * count + t - begin] = dot(&query[g * d], key, d);
    });
  }
  std::vector<float> inverse_sum(group);
  for (int64_t g = 0; g < group; ++g) {
    float* row = &scores[g * count];
    if (cap > 0.f) soft_cap(row, count, cap);
    const float top = *std::max_element(row, row + count);
    int64_t t = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; t + 8 <= count; t += 8)
      _mm256_storeu_ps(row + t, energon_hf::exp8(_mm256_sub_ps(_mm256_loadu_ps(row + t), _mm256_set1_ps(top))));
#endif
    for (; t < count; ++t) row[t] = std::exp(row[t] - top);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < count; ++t) sum += row[t];
    inverse_sum[g] = 1.f / sum;
    scratch.resize(count);
    round_to(row, scratch.data(), count);
  }
  std::fill(acc.begin(), acc.end(), 0.f);
#if defined(__AVX512F__)
  if (vector_path) {
    for_each_run(v_cache, table, begin, len, s, kv_head, s.block_size, [&](int64_t t, int64_t n, const T* values,
                                                                           int64_t stride) {
      run_values_n(group, &scores[t - begin], count, values, stride, n, d, acc.data(),
                   std::make_integer_sequence<int, kMaxGroup>{});
    });
  } else
#endif
  {
    for_each_slot(v_cache, table, begin, len, s, kv_head, [&](int64_t t, const T* value) {
      for (int64_t g = 0; g < group; ++g) add_scaled(&acc[g * d], scores[g * count + t - begin], value, d);
    });
  }
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t i = 0; i < d; ++i) acc[g * d + i] *= inverse_sum[g];
    from_float(&acc[g * d], out + (kv_head * group + g) * d, d);
  }
}

// Every block a sequence reads must be in the cache: a bad table would read outside it.
void check_tables(const int64_t* tables, const int64_t* lens, const Shape& s, int64_t num_blocks) {
  for (int64_t b = 0; b < s.batch; ++b) {
    TORCH_CHECK(lens[b] > 0 && lens[b] <= s.max_blocks * s.block_size, "paged_decode: sequence ", b,
                "'s context length ", lens[b], " does not fit its block table");
    for (int64_t blk = 0; blk * s.block_size < lens[b]; ++blk) {
      const int64_t id = tables[b * s.max_blocks + blk];
      TORCH_CHECK(id >= 0 && id < num_blocks, "paged_decode: block ", id, " of sequence ", b, " is not in the cache");
    }
  }
}

// Every (sequence, key/value head) pair; `window` > 0: each sequence's last `window` keys only.
template <typename T>
void attend_all(const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& tables,
                const at::Tensor& lens, at::Tensor& out, const Shape& s, float scale, int64_t window, float cap) {
  const T *qp = query.data_ptr<T>(), *kp = k_cache.data_ptr<T>(), *vp = v_cache.data_ptr<T>();
  const int64_t *tp = tables.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t group = s.q_heads / s.kv_heads;
  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query_buf(group * s.head_dim), scores, acc(group * s.head_dim);
    std::vector<T> scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.kv_heads, h = item % s.kv_heads, row = b * s.q_heads * s.head_dim;
      const int64_t first = window > 0 ? std::max<int64_t>(0, lp[b] - window) : 0;
      attend_one(qp + row, kp, vp, tp + b * s.max_blocks, first, lp[b], op + row, s, h, scale, cap, query_buf, scores,
                 acc, scratch);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                        std::optional<int64_t> window, std::optional<double> softcap) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "paged_decode: q [B, Hq, D], k_cache and v_cache [blocks, block_size, Hkv, D]");
  const auto dtype = k_cache.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) && q.scalar_type() == dtype &&
                  v_cache.scalar_type() == dtype,
              "paged_decode: q, k_cache and v_cache must share one dtype, float32, bfloat16 or float16");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode: the caches must be contiguous");
  TORCH_CHECK(!window || *window > 0, "paged_decode: a window must be positive, got ", window.value_or(0));
  TORCH_CHECK(!softcap || *softcap > 0, "paged_decode: a softcap must be positive, got ", softcap.value_or(0));
  TORCH_CHECK(k_cache.size(2) > 0 && q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0,
              "paged_decode: q's heads and head size do not fit the cache");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && context_lens.numel() == q.size(0),
              "paged_decode: one block table row and one context length per sequence");
  const auto query = q.contiguous();
  const auto tables = block_tables.to(at::kLong).contiguous();
  const auto lens = context_lens.to(at::kLong).contiguous();
  const Shape s{q.size(0), q.size(1), k_cache.size(2), q.size(2), k_cache.size(1), tables.size(1)};
  check_tables(tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), s, k_cache.size(0));
  auto out = at::empty_like(query);
  const float factor = static_cast<float>(scale), cap = static_cast<float>(softcap.value_or(0.0));
  const int64_t keys = window.value_or(0);
  energon_hf::dispatch(dtype, [&](auto tag) {
    using T = decltype(tag);
    attend_all<T>(query, k_cache, v_cache, tables, lens, out, s, factor, keys, cap);
  });
  return out;
}

// New tokens' keys and values [T, Hkv, D] (any strides: slices of a fused projection) stored at their slots
// (block * block_size + offset) of one layer's caches [blocks, block_size, Hkv, D]: one op where torch takes two
// index_copy_ calls and their views (about 10 us of glue per layer in a SmolLM2 decode step).
void copy_rows(char* cache, const at::Tensor& src, const int64_t* slots) {
  const int64_t tokens = src.size(0), heads = src.size(1), dim = src.size(2), item = src.element_size();
  const auto* base = static_cast<const char*>(src.data_ptr());
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < heads; ++h) {
      char* dst = cache + ((slots[t] * heads + h) * dim) * item;
      const char* row = base + (t * src.stride(0) + h * src.stride(1)) * item;
      if (src.stride(2) == 1) {
        std::memcpy(dst, row, dim * item);
      } else {
        for (int64_t d = 0; d < dim; ++d) std::memcpy(dst + d * item, row + d * src.stride(2) * item, item);
      }
    }
}

void kv_cache_write(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& slots) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() &&
                  v_cache.is_contiguous() && v_cache.scalar_type() == k_cache.scalar_type(),
              "kv_cache_write: k_cache and v_cache must be contiguous [blocks, block_size, Hkv, D] tensors of one "
              "dtype");
  const int64_t capacity = k_cache.size(0) * k_cache.size(1);
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == k.size(0) && t->size(1) == k_cache.size(2) &&
                    t->size(2) == k_cache.size(3) && t->scalar_type() == k_cache.scalar_type(),
                "kv_cache_write: k and v must be [tokens, ", k_cache.size(2), ", ", k_cache.size(3),
                "] tensors of the cache's dtype");
  TORCH_CHECK(slots.dim() == 1 && slots.numel() == k.size(0) && slots.scalar_type() == at::kLong &&
                  slots.is_contiguous(),
              "kv_cache_write: one int64 slot per token");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < k.size(0); ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < capacity, "kv_cache_write: slot ", sp[t], " is outside the cache's ", capacity);
  copy_rows(static_cast<char*>(k_cache.data_ptr()), k, sp);
  copy_rows(static_cast<char*>(v_cache.data_ptr()), v, sp);
}

}  // namespace

TORCH_LIBRARY(energon_hf, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale, int? window=None, float? softcap=None) -> Tensor");
  m.def("kv_cache_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(energon_hf, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("kv_cache_write", &kv_cache_write);
}
