// Vector math the compiled CPU ops share.
#pragma once

#include <cmath>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace energon_hf {

// e^x, 8 lanes, within 3 units in the last place for x in [-87.3, 88.3] (Cephes' expf: a degree-6 polynomial on
// x - n ln 2, times 2^n built in the exponent bits); infinity above, zero below, NaN stays NaN. glibc's expf is
// called one element at a time here (its vector variants are declared only under -ffast-math): a SiLU-and-mul of
// 512 SmolLM2 rows took 1.14 ms that way, 2.4x torch's silu and mul, and 8 rows 39 against 18 us.
inline __m256 exp8(__m256 given) {
  const __m256 x = _mm256_min_ps(_mm256_set1_ps(88.3f), _mm256_max_ps(_mm256_set1_ps(-87.3f), given));  // NaN kept
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2 in two parts: r exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 overflow = _mm256_cmp_ps(given, _mm256_set1_ps(88.3f), _CMP_GT_OQ);
  const __m256 underflow = _mm256_cmp_ps(given, _mm256_set1_ps(-87.3f), _CMP_LT_OQ);  // else e^-87.3 ~ FLT_MIN
  const __m256 e = _mm256_blendv_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(scale)), _mm256_set1_ps(INFINITY), overflow);
  return _mm256_andnot_ps(underflow, e);
}

#if defined(__AVX512F__)
// exp8 on 16 lanes, the same polynomial and clamps (the attention softmax over long rows).
inline __m512 exp16(__m512 given) {
  const __m512 x = _mm512_min_ps(_mm512_set1_ps(88.3f), _mm512_max_ps(_mm512_set1_ps(-87.3f), given));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  __m512 e = _mm512_mul_ps(p, _mm512_castsi512_ps(scale));
  e = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(given, _mm512_set1_ps(88.3f), _CMP_GT_OQ), e,
                           _mm512_set1_ps(INFINITY));
  return _mm512_maskz_mov_ps(~_mm512_cmp_ps_mask(given, _mm512_set1_ps(-87.3f), _CMP_LT_OQ), e);  // NaN kept
}
#endif

}  // namespace energon_hf
#endif
