// AVX-512F kernels (16 floats a vector): compiled for those instructions by a target pragma
// (function by function), chosen at run time only on CPUs that have them (dispatch.cpp).
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstdint>

#include "kernels.h"

namespace mlxserve_qmm {
namespace avx512 {

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#endif

struct V {
  using vf = __m512;
  static constexpr int W = 16;
  static inline vf zero() { return _mm512_setzero_ps(); }
  static inline vf set1(float a) { return _mm512_set1_ps(a); }
  static inline vf load(const float* p) { return _mm512_loadu_ps(p); }
  static inline void store(float* p, vf a) { _mm512_storeu_ps(p, a); }
  static inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
  static inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
  static inline float hsum(vf a) { return _mm512_reduce_add_ps(a); }
  // 16 bytes -> 16 floats.
  static inline vf u8_to_f(const uint8_t* p) {
    __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
  }
  // 16 bytes -> their 16 low nibbles and their 16 high nibbles, as floats.
  static inline void nib_to_f(const uint8_t* p, vf& lo, vf& hi) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
  }
};

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

#include "kernel_impl.inc"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

}  // namespace avx512

const Isa& isa_avx512() {
  static const Isa isa{"avx512", avx512::V::W, &avx512::rows, &avx512::dequantize};
  return isa;
}

}  // namespace mlxserve_qmm

#endif
