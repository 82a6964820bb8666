// float32, bfloat16 and float16 elements as the compiled ops read and write them: half precision is widened to
// float32 as it is loaded, computed there, and rounded to nearest even (torch's rounding) where it is stored or
// where torch's op sequence rounds.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace energon_hf {

// Rows of T <-> float32, 8 lanes at a time where the vector instructions compiled in (a scalar c10::Half
// conversion per element made a SiLU-and-mul of one SmolLM2 row 20 us against 8.5 in float32). Rounding is
// torch's: to nearest even.
inline void to_float(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void from_float(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
  auto* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
}

inline void from_float(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {  // c10's round_to_nearest_even: NaN becomes 0x7FC0
    const __m256 v = _mm256_loadu_ps(src + i);
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), packed);
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<c10::BFloat16>(src[i]);
}

inline void to_float(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void from_float(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

// Round a float32 row to T and back in place: what an op computing in T keeps of it (all of it for float32).
template <class T>
inline void round_to(float* row, T* scratch, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) {
    from_float(row, scratch, n);
    to_float(scratch, row, n);
  }
}

// f(T{}) for the dtype's element type T: float16, bfloat16, else float32 (the dtypes the ops check for first).
template <class F>
void dispatch(c10::ScalarType dtype, F f) {
  if (dtype == c10::kHalf)
    f(c10::Half{});
  else if (dtype == c10::kBFloat16)
    f(c10::BFloat16{});
  else
    f(float{});
}

#if defined(__AVX512F__)
// 16 elements from p, widened to float32 (exactly).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 16 float32 lanes stored as T, rounded as from_float rounds.
template <class T>
inline void store16(T* p, __m512 v) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_storeu_ps(p, v);
  } else {
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, v);
    from_float(lanes, p, 16);
  }
}
#endif

}  // namespace energon_hf
