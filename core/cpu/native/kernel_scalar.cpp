// The portable kernels: plain C++ on 8-float arrays, which the compiler vectorizes with the
// baseline instructions of the target (SSE2 on x86-64). Every CPU runs these.
#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace mlxserve_qmm {
namespace scalar {

struct V {
  static constexpr int W = 8;
  struct vf {
    float v[W];
  };
  static inline vf zero() { return set1(0.0f); }
  static inline vf set1(float a) {
    vf r;
    for (int i = 0; i < W; i++) r.v[i] = a;
    return r;
  }
  static inline vf load(const float* p) {
    vf r;
    for (int i = 0; i < W; i++) r.v[i] = p[i];
    return r;
  }
  static inline void store(float* p, vf a) {
    for (int i = 0; i < W; i++) p[i] = a.v[i];
  }
  static inline vf fma(vf a, vf b, vf c) {
    vf r;
    for (int i = 0; i < W; i++) r.v[i] = __builtin_fmaf(a.v[i], b.v[i], c.v[i]);
    return r;
  }
  static inline vf add(vf a, vf b) {
    vf r;
    for (int i = 0; i < W; i++) r.v[i] = a.v[i] + b.v[i];
    return r;
  }
  static inline float hsum(vf a) {
    float s = 0.0f;
    for (int i = 0; i < W; i++) s += a.v[i];
    return s;
  }
  static inline vf u8_to_f(const uint8_t* p) {
    vf r;
    for (int i = 0; i < W; i++) r.v[i] = static_cast<float>(p[i]);
    return r;
  }
  static inline void nib_to_f(const uint8_t* p, vf& lo, vf& hi) {
    for (int i = 0; i < W; i++) {
      lo.v[i] = static_cast<float>(p[i] & 15);
      hi.v[i] = static_cast<float>(p[i] >> 4);
    }
  }
};

// IEEE half to float, subnormals, infinities and NaNs included.
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      int e = -1;
      do {
        e++;
        mant <<= 1;
      } while ((mant & 0x400) == 0);
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

#include "kernel_impl.inc"

}  // namespace scalar

const Isa& isa_scalar() {
  static const Isa isa{"scalar", scalar::V::W, &scalar::rows, &scalar::dequantize};
  return isa;
}

}  // namespace mlxserve_qmm
