// The quantized-matmul kernels, free of MLX: plain pointers in, plain pointers out.
//
// y[m, n] = sum_k x[m, k] * (scale[n, g] * q[n, k] + bias[n, g]),  g = k / group_size,
// for MLX's affine layout: each row of w packs K values of `bits` bits as one little-endian
// bit stream (value i in bits [i*bits, (i+1)*bits)), which is how mx.quantize packs 2..8 bits.
#pragma once

#include <cstdint>

namespace mlxserve_qmm {

enum class ScaleType : int { f32 = 0, f16 = 1, bf16 = 2 };

struct Problem {
  const float* x;        // [M, K] row-major (bits 4: permuted per chunk, see permute_x)
  const uint8_t* w;      // [N, K * bits / 8] bytes
  const void* scales;    // [N, K / group_size] of `stype`
  const void* biases;    // [N, K / group_size] of `stype`
  float* out;            // [M, N] row-major
  const float* xsum;     // [K / group_size] sums of x's row over each group (M == 1), or null
  int M, N, K, bits, group_size;
  ScaleType stype;
};

// One instruction set's kernels. `width` is its float vector width: 4-bit x is permuted in
// chunks of 2*width values (the even-indexed values, then the odd-indexed ones).
struct Isa {
  const char* name;
  int width;
  // out[:, n0:n1] of a fused dequantize-and-dot (x prepared by permute_x when bits == 4).
  void (*rows)(const Problem& p, int n0, int n1);
  // dst[(n - n0) * K + k] = the float32 dequantized weight (for BLAS), in x's order: for
  // 4 bits the order of permute_x, else the natural one.
  void (*dequantize)(const Problem& p, int n0, int n1, float* dst);
};

const Isa& isa_scalar();
#if defined(__x86_64__) || defined(_M_X64)
const Isa& isa_avx2();
const Isa& isa_avx512();
#endif
#if defined(__aarch64__)
const Isa& isa_neon();
#endif

// The best instruction set this CPU runs (MLXSERVE_QMM_ISA may force a lower one: tests).
const Isa& best_isa();

// dst = x with each chunk of 2*width values reordered to the even-indexed, then odd-indexed.
void permute_x(const float* x, int M, int K, int width, float* dst);

}  // namespace mlxserve_qmm
