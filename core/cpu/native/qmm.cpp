#include "qmm.h"

#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"
#include "row_major.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"

namespace mlxserve_qmm {
namespace {

using mlxserve_native::describe;
using mlxserve_native::Packed;
using mlxserve_native::row_major;

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("[mlxserve quantized_matmul] " + what);
}

ScaleType scale_type(mx::Dtype d) {
  if (d == mx::float16) return ScaleType::f16;
  if (d == mx::bfloat16) return ScaleType::bf16;
  return ScaleType::f32;
}

}  // namespace

mx::array quantized_matmul(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s) {
  check(bits == 2 || bits == 3 || bits == 4 || bits == 5 || bits == 6 || bits == 8,
        "bits must be 2, 3, 4, 5, 6 or 8, got " + std::to_string(bits));
  check(group_size == 32 || group_size == 64 || group_size == 128,
        "group_size must be 32, 64 or 128, got " + std::to_string(group_size));
  check(x.dtype() == mx::float32, "x must be float32");
  check(x.ndim() >= 1, "x must have at least one dimension");
  check(w.dtype() == mx::uint32 && w.ndim() == 2, "w must be a 2-D uint32 array");
  const auto sd = scales.dtype();
  check(sd == mx::float16 || sd == mx::bfloat16 || sd == mx::float32,
        "scales must be float16, bfloat16 or float32");
  check(biases.dtype() == sd, "biases must have the dtype of scales");
  const int K = x.shape(-1);
  const int N = w.shape(0);
  check(static_cast<long>(w.shape(1)) * 32 == static_cast<long>(K) * bits,
        "w's packed width does not match x's last dimension for these bits");
  check(K % group_size == 0, "x's last dimension must be a multiple of group_size");
  check(scales.ndim() == 2 && scales.shape(0) == N && scales.shape(1) == K / group_size,
        "scales must be [N, K / group_size]");
  check(biases.shape() == scales.shape(), "biases must have the shape of scales");

  auto stream = mx::to_stream(s, mx::Device::cpu);
  check(stream.device == mx::Device::cpu, "runs on the CPU only");
  auto shape = x.shape();
  shape.back() = N;
  std::vector<mx::array> inputs = {x, w, scales, biases};
  return mx::array(
      std::move(shape),
      mx::float32,
      std::make_shared<QuantizedMatmulCpu>(stream, group_size, bits),
      std::move(inputs));
}

void QuantizedMatmulCpu::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  const auto& w = inputs[1];
  const auto& scales = inputs[2];
  const auto& biases = inputs[3];
  out.set_data(mx::allocator::malloc(out.nbytes()));

  Problem p;
  p.xsum = nullptr;
  p.out = out.data<float>();
  p.K = x.shape(-1);
  p.M = p.K == 0 ? 0 : static_cast<int>(x.size() / p.K);
  p.N = w.shape(0);
  p.bits = bits_;
  p.group_size = group_size_;
  p.stype = scale_type(scales.dtype());
  std::vector<Packed> parts = {describe(x), describe(w), describe(scales), describe(biases)};

  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(x);
  encoder.set_input_array(w);
  encoder.set_input_array(scales);
  encoder.set_input_array(biases);
  encoder.set_output_array(out);
  encoder.dispatch([p, parts = std::move(parts)]() mutable {
    if (p.M == 0 || p.N == 0) return;
    std::vector<uint8_t> copies[4];
    p.x = reinterpret_cast<const float*>(row_major(parts[0], copies[0]));
    p.w = row_major(parts[1], copies[1]);
    p.scales = row_major(parts[2], copies[2]);
    p.biases = row_major(parts[3], copies[3]);
    run(p);
  });
}

void QuantizedMatmulCpu::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mlxserve quantized_matmul] has no GPU implementation");
}

bool QuantizedMatmulCpu::is_equivalent(const mx::Primitive& other) const {
  const auto* o = dynamic_cast<const QuantizedMatmulCpu*>(&other);
  return o != nullptr && group_size_ == o->group_size_ && bits_ == o->bits_;
}

std::vector<mx::Shape> QuantizedMatmulCpu::output_shapes(const std::vector<mx::array>& inputs) {
  auto shape = inputs[0].shape();
  shape.back() = inputs[1].shape(0);
  return {shape};
}

}  // namespace mlxserve_qmm
