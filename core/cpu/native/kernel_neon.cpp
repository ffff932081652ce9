// NEON kernels (4 floats a vector) for arm64, where NEON is always present.
#if defined(__aarch64__)

#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace mlxserve_qmm {
namespace neon {

struct V {
  using vf = float32x4_t;
  static constexpr int W = 4;
  static inline vf zero() { return vdupq_n_f32(0.0f); }
  static inline vf set1(float a) { return vdupq_n_f32(a); }
  static inline vf load(const float* p) { return vld1q_f32(p); }
  static inline void store(float* p, vf a) { vst1q_f32(p, a); }
  static inline vf fma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
  static inline vf add(vf a, vf b) { return vaddq_f32(a, b); }
  static inline float hsum(vf a) { return vaddvq_f32(a); }
  static inline uint32x4_t widen4(const uint8_t* p) {
    uint32_t word;
    std::memcpy(&word, p, 4);
    uint8x8_t b = vreinterpret_u8_u32(vdup_n_u32(word));
    return vmovl_u16(vget_low_u16(vmovl_u8(b)));
  }
  // 4 bytes -> 4 floats.
  static inline vf u8_to_f(const uint8_t* p) { return vcvtq_f32_u32(widen4(p)); }
  // 4 bytes -> their 4 low nibbles and their 4 high nibbles, as floats.
  static inline void nib_to_f(const uint8_t* p, vf& lo, vf& hi) {
    uint32x4_t b = widen4(p);
    lo = vcvtq_f32_u32(vandq_u32(b, vdupq_n_u32(15)));
    hi = vcvtq_f32_u32(vshrq_n_u32(b, 4));
  }
};

static inline float half_to_float(uint16_t h) {
  __fp16 f;
  std::memcpy(&f, &h, 2);
  return static_cast<float>(f);
}

#include "kernel_impl.inc"

}  // namespace neon

const Isa& isa_neon() {
  static const Isa isa{"neon", neon::V::W, &neon::rows, &neon::dequantize};
  return isa;
}

}  // namespace mlxserve_qmm

#endif
