// Weight-only quantized matrices expanded to bfloat16 (or float32: the exact quantizations) for products with
// many rows. torch's int4 CPU
// kernel costs about as much per row as a whole GEMV (SmolLM2's layer at 512 rows: 21.8 ms), so from a few rows
// on, expanding the weight once into a reused buffer and running the dense bfloat16 GEMM (oneDNN: AMX or
// AVX512-BF16; 1.9 ms) is many times faster. int8 through torch (`q * scale` into a bfloat16 tensor) cost 1.9 ms
// per SmolLM2 layer, 5x this file's loop, and rounded twice (the scale to bfloat16, then the product).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// Round to nearest even, as torch's conversion does, without its NaN branch (the values are finite): branch-free,
// so the loop vectorizes.
inline uint16_t to_bfloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

inline float to_out(float value, float*) { return value; }
inline uint16_t to_out(float value, uint16_t*) { return to_bfloat16(value); }

void check_target(const at::Tensor& weight, int64_t out_features, int64_t in_features, const char* op) {
  TORCH_CHECK((weight.scalar_type() == at::kBFloat16 || weight.scalar_type() == at::kFloat) && weight.is_contiguous() &&
                  weight.sizes() == at::IntArrayRef({out_features, in_features}),
              op, ": weight must be a contiguous [out, in] bfloat16 or float32 tensor");
}

// Whether 16-lane stores of Out compiled in: float32 needs AVX-512, bfloat16 its BF16 conversion too.
template <class Out>
constexpr bool stores16() {
#if defined(__AVX512BF16__)
  return true;
#elif defined(__AVX512F__)
  return std::is_same_v<Out, float>;
#else
  return false;
#endif
}

#if defined(__AVX512F__)
inline void store16(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }
#endif
#if defined(__AVX512BF16__)
inline void store16(uint16_t* dst, __m512 v) {  // 16 float32 lanes as bfloat16, rounded to nearest even
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}
#endif

// Into w: bfloat16 bits (Out = uint16_t) or float32.
template <class Out>
void expand_int4(const at::Tensor& nibbles, const at::Tensor& scales_and_mins, int64_t group_size, Out* w) {
  const uint8_t* q = nibbles.data_ptr<uint8_t>();
  const at::Half* table = scales_and_mins.data_ptr<at::Half>();
  const int64_t groups = scales_and_mins.size(0) * scales_and_mins.size(1);
  at::parallel_for(0, groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {  // item: (row, group), the table's own order
      const float scale = static_cast<float>(table[2 * item]), min = static_cast<float>(table[2 * item + 1]);
      const int64_t half = group_size / 2;
      const uint8_t* src = q + item * half;
      Out* dst = w + item * group_size;
#if defined(__AVX512F__)
      if (stores16<Out>() && half % 16 == 0) {  // 16 bytes -> 32 weights in a dozen instructions (loops: ~5x slower)
        const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(min);
        for (int64_t i = 0; i < half; i += 16) {
          const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
          const __m512 low = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
          const __m512 high = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
          store16(dst + i, _mm512_fmadd_ps(low, s, z));
          store16(dst + half + i, _mm512_fmadd_ps(high, s, z));
        }
        continue;
      }
#endif
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) dst[i] = to_out(static_cast<float>(src[i] & 15) * scale + min, dst);
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) dst[half + i] = to_out(static_cast<float>(src[i] >> 4) * scale + min, dst);
    }
  });
}

template <class Out>
void expand_int8(const at::Tensor& q8, const at::Tensor& scale, Out* w) {
  const int8_t* q = q8.data_ptr<int8_t>();
  const float* scales = scale.data_ptr<float>();
  const int64_t in_features = q8.size(1), groups = scale.size(1), group = in_features / groups;
  at::parallel_for(0, q8.size(0) * groups, 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {  // item: (row, group)
      const float s = scales[item];
      const int8_t* src = q + item * group;
      Out* dst = w + item * group;
      int64_t i = 0;
#if defined(__AVX512F__)
      const __m512 vs = _mm512_set1_ps(s);
      for (; stores16<Out>() && i + 16 <= group; i += 16)
        store16(dst + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                           _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)))), vs));
#endif
#pragma omp simd
      for (int64_t j = i; j < group; ++j) dst[j] = to_out(static_cast<float>(src[j]) * s, dst);
    }
  });
}

// expand(w) on the target's elements: float32, or bfloat16 as its bits.
template <class Expand>
void with_target(at::Tensor& weight, Expand expand) {
  if (weight.scalar_type() == at::kFloat)
    expand(weight.data_ptr<float>());
  else
    expand(reinterpret_cast<uint16_t*>(weight.data_ptr<c10::BFloat16>()));
}

// nibbles [out, in / 2] uint8, group by group: byte i of a group holds its element i in the low half and its
// element i + group / 2 in the high half, so both halves expand with contiguous stores; scales_and_mins
// [out, in / group, 2] float16 (the int4 GEMV's table, gemv.cpp): w = q * scale + min, into `weight`.
void dequantize_int4_into(const at::Tensor& nibbles, const at::Tensor& scales_and_mins, int64_t group_size,
                          at::Tensor& weight) {
  TORCH_CHECK(nibbles.scalar_type() == at::kByte && nibbles.dim() == 2 && nibbles.is_contiguous(),
              "dequantize_int4_into: nibbles must be a contiguous [out, in / 2] uint8 tensor");
  const int64_t out_features = nibbles.size(0), in_features = nibbles.size(1) * 2;
  TORCH_CHECK(group_size > 0 && group_size % 2 == 0 && in_features % group_size == 0,
              "dequantize_int4_into: ", in_features, " input features do not split into groups of ", group_size);
  const int64_t groups = in_features / group_size;
  TORCH_CHECK(scales_and_mins.scalar_type() == at::kHalf && scales_and_mins.is_contiguous() &&
                  scales_and_mins.sizes() == at::IntArrayRef({out_features, groups, 2}),
              "dequantize_int4_into: scales_and_mins must be a contiguous [out, in / group, 2] float16 tensor");
  check_target(weight, out_features, in_features, "dequantize_int4_into");
  with_target(weight, [&](auto* w) { expand_int4(nibbles, scales_and_mins, group_size, w); });
}

// int8 [out, in] with scales [out, groups] float32 (one group: per channel; groups of 32: GGUF's Q8_0):
// w = q * scale, rounded once, into `weight`.
void dequantize_int8_into(const at::Tensor& q8, const at::Tensor& scale, at::Tensor& weight) {
  TORCH_CHECK(q8.scalar_type() == at::kChar && q8.dim() == 2 && q8.is_contiguous(),
              "dequantize_int8_into: q must be a contiguous [out, in] int8 tensor");
  const int64_t out_features = q8.size(0), in_features = q8.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(0) == out_features && scale.size(1) > 0 && in_features % scale.size(1) == 0,
              "dequantize_int8_into: scale must be a contiguous [out, groups] float32 tensor that divides ",
              in_features, " features");
  check_target(weight, out_features, in_features, "dequantize_int8_into");
  with_target(weight, [&](auto* w) { expand_int8(q8, scale, w); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(energon_hf, m) {
  m.def("dequantize_int4_into(Tensor nibbles, Tensor scales_and_mins, int group_size, Tensor(a!) weight) -> ()");
  m.def("dequantize_int8_into(Tensor q, Tensor scale, Tensor(a!) weight) -> ()");
}

TORCH_LIBRARY_IMPL(energon_hf, CPU, m) {
  m.impl("dequantize_int4_into", &dequantize_int4_into);
  m.impl("dequantize_int8_into", &dequantize_int8_into);
}
