// Decode attention on CPU that reads the paged KV cache in place: one query token per sequence, every query head
// of a key/value head together, float32. No block is gathered and nothing is padded or masked.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

struct Shape {
  int64_t batch, q_heads, kv_heads, head_dim, block_size, max_blocks;
};

constexpr int64_t kMaxGroup = 8;  // query heads per key/value head that the vector path keeps in registers

// The portable loops: any head size, any group (a single 64-wide dot is a chain of dependent FMAs, hence slower).
inline float dot(const float* q, const float* k, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += q[i] * k[i];
  return sum;
}

inline void add_scaled(float* acc, float p, const float* v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += p * v[i];
}

#if defined(__AVX512F__)
// Each key's dot product with every query head of the group: one load of the key serves all of them, and the
// group's independent sums keep the FMA units busy. Head sizes that are multiples of 16, groups of up to 8.
inline void scores_avx512(const float* query, const float* key, int64_t group, int64_t d, float* out,
                          int64_t stride) {
  __m512 acc[kMaxGroup];
  for (int64_t g = 0; g < group; ++g) acc[g] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 16) {
    const __m512 k = _mm512_loadu_ps(key + i);
    for (int64_t g = 0; g < group; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(query + g * d + i), k, acc[g]);
  }
  for (int64_t g = 0; g < group; ++g) out[g * stride] = _mm512_reduce_add_ps(acc[g]);
}

inline void values_avx512(const float* weights, int64_t stride, const float* value, int64_t group, int64_t d,
                          float* acc) {
  for (int64_t i = 0; i < d; i += 16) {
    const __m512 v = _mm512_loadu_ps(value + i);
    for (int64_t g = 0; g < group; ++g) {
      float* a = acc + g * d + i;
      _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(weights[g * stride]), v, _mm512_loadu_ps(a)));
    }
  }
}
#endif

// fn(t, that head's vector) for token t = 0 .. len - 1 of a sequence, walking its block table: the one place that
// knows the cache's layout [blocks, block_size, kv_heads, head_dim].
template <typename Fn>
inline void for_each_slot(const float* cache, const int64_t* table, int64_t len, const Shape& s, int64_t kv_head,
                          Fn&& fn) {
  const int64_t slot_stride = s.kv_heads * s.head_dim, block_stride = s.block_size * slot_stride;
  for (int64_t start = 0, blk = 0; start < len; start += s.block_size, ++blk) {
    const float* slots = cache + table[blk] * block_stride + kv_head * s.head_dim;
    const int64_t n = std::min(s.block_size, len - start);
    for (int64_t j = 0; j < n; ++j) fn(start + j, slots + j * slot_stride);
  }
}

// One (sequence, key/value head) pair: its `group` query heads against the sequence's keys, block by block; the
// scores of all its keys, one softmax, then the weighted sum of the values.
void attend_one(const float* q, const float* k_cache, const float* v_cache, const int64_t* table, int64_t len,
                float* out, const Shape& s, int64_t kv_head, float scale, std::vector<float>& query,
                std::vector<float>& scores, std::vector<float>& acc) {
  const int64_t group = s.q_heads / s.kv_heads, d = s.head_dim;
  [[maybe_unused]] const bool vector_path = d % 16 == 0 && group <= kMaxGroup;
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < d; ++i) query[g * d + i] = q[(kv_head * group + g) * d + i] * scale;
  scores.resize(group * len);
  for_each_slot(k_cache, table, len, s, kv_head, [&](int64_t t, const float* key) {
#if defined(__AVX512F__)
    if (vector_path) return scores_avx512(query.data(), key, group, d, &scores[t], len);
#endif
    for (int64_t g = 0; g < group; ++g) scores[g * len + t] = dot(&query[g * d], key, d);
  });
  std::vector<float> inverse_sum(group);
  for (int64_t g = 0; g < group; ++g) {
    float* row = &scores[g * len];
    const float top = *std::max_element(row, row + len);
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) row[t] = std::exp(row[t] - top);  // glibc's vector expf (-fno-math-errno)
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < len; ++t) sum += row[t];
    inverse_sum[g] = 1.f / sum;
  }
  std::fill(acc.begin(), acc.end(), 0.f);
  for_each_slot(v_cache, table, len, s, kv_head, [&](int64_t t, const float* value) {
#if defined(__AVX512F__)
    if (vector_path) return values_avx512(&scores[t], len, value, group, d, acc.data());
#endif
    for (int64_t g = 0; g < group; ++g) add_scaled(&acc[g * d], scores[g * len + t], value, d);
  });
  for (int64_t g = 0; g < group; ++g)
    for (int64_t i = 0; i < d; ++i) out[(kv_head * group + g) * d + i] = acc[g * d + i] * inverse_sum[g];
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

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "paged_decode: q [B, Hq, D], k_cache and v_cache [blocks, block_size, Hkv, D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
              v_cache.scalar_type() == at::kFloat, "paged_decode: q, k_cache and v_cache must be float32");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode: the caches must be contiguous");
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
  const float *qp = query.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  const int64_t *tp = tables.data_ptr<int64_t>(), *lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t group = s.q_heads / s.kv_heads;
  at::parallel_for(0, s.batch * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> query_buf(group * s.head_dim), scores, acc(group * s.head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.kv_heads, h = item % s.kv_heads, row = b * s.q_heads * s.head_dim;
      attend_one(qp + row, kp, vp, tp + b * s.max_blocks, lp[b], op + row, s, h, static_cast<float>(scale), query_buf,
                 scores, acc);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(energon_hf, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(energon_hf, CPU, m) { m.impl("paged_decode", &paged_decode); }
