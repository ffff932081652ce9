// AVX2 + FMA + F16C kernels: compiled for those instructions by a target pragma (function by
// function), chosen at run time only on CPUs that have them (dispatch.cpp).
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

namespace mlxserve_qmm {
namespace avx2 {

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

struct V {
  using vf = __m256;
  static constexpr int W = 8;
  static inline vf zero() { return _mm256_setzero_ps(); }
  static inline vf set1(float a) { return _mm256_set1_ps(a); }
  static inline vf load(const float* p) { return _mm256_loadu_ps(p); }
  static inline void store(float* p, vf a) { _mm256_storeu_ps(p, a); }
  static inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
  static inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
  static inline float hsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // 8 bytes -> 8 floats.
  static inline vf u8_to_f(const uint8_t* p) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  }
  // B bytes (B = 2, 3, 5, 6) -> the 8 values of B bits they pack, in order, as floats: the
  // bytes in each 64-bit lane, the even-indexed values shifted to the low half of the lanes,
  // the odd-indexed ones to the high half.
  template <int B>
  static inline vf bits8_to_f(const uint8_t* p);
  // 8 bytes -> their 8 low nibbles and their 8 high nibbles, as floats.
  static inline void nib_to_f(const uint8_t* p, vf& lo, vf& hi) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  }
};

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

#include "kernel_impl.inc"

// (Defined after kernel_impl.inc, whose load_bits8 it uses; templates are instantiated at
// the end of the file.)
template <int B>
inline V::vf V::bits8_to_f(const uint8_t* p) {
  const __m256i all = _mm256_set1_epi64x(static_cast<long long>(load_bits8<B>(p)));
  const __m256i even = _mm256_srlv_epi64(all, _mm256_setr_epi64x(0, 2 * B, 4 * B, 6 * B));
  const __m256i odd = _mm256_srlv_epi64(all, _mm256_setr_epi64x(B, 3 * B, 5 * B, 7 * B));
  const __m256i both = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  return _mm256_cvtepi32_ps(_mm256_and_si256(both, _mm256_set1_epi32((1 << B) - 1)));
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

}  // namespace avx2

const Isa& isa_avx2() {
  static const Isa isa{"avx2", avx2::V::W, &avx2::rows, &avx2::dequantize};
  return isa;
}

}  // namespace mlxserve_qmm

#endif
