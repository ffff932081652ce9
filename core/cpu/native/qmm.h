// The MLX op and primitive: y = x @ dequantize(w, scales, biases).T on the CPU, for MLX's
// affine quantization (mx.quantize(..., mode="affine")).
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlxserve_qmm {

namespace mx = mlx::core;

// x float32 [..., K]; w uint32 [N, K * bits / 32]; scales, biases [N, K / group_size] of
// float16, bfloat16 or float32; bits 2, 3, 4, 5, 6 or 8; group_size 32, 64 or 128.
// Returns float32 [..., N]. Throws std::invalid_argument for anything else.
mx::array quantized_matmul(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

class QuantizedMatmulCpu : public mx::UnaryPrimitive {
 public:
  QuantizedMatmulCpu(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "MlxserveQuantizedMatmulCpu"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int group_size_;
  int bits_;
};

}  // namespace mlxserve_qmm
