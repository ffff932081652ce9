// An array's bytes in row-major order, read when a task runs (shared by the primitives).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "mlx/array.h"

namespace mlxserve_native {

namespace mx = mlx::core;

// An input's bytes in row-major order: its own buffer when it is row-contiguous (nearly
// always: weights as loaded, activations as ops produce them), else a copy made when the task
// runs. Copying here, not with a Contiguous node per input, keeps four graph nodes (and their
// scheduling, ~10 us each on the CPU) out of every call.
struct Packed {
  const uint8_t* data;
  std::vector<int> shape;
  std::vector<int64_t> strides;
  size_t itemsize;
  size_t size;
  bool contiguous;
};

inline Packed describe(const mx::array& a) {
  return {reinterpret_cast<const uint8_t*>(a.data<void>()),
          std::vector<int>(a.shape().begin(), a.shape().end()),
          std::vector<int64_t>(a.strides().begin(), a.strides().end()),
          a.itemsize(),
          a.size(),
          a.flags().row_contiguous};
}

inline const uint8_t* row_major(const Packed& a, std::vector<uint8_t>& copy) {
  if (a.contiguous) return a.data;
  copy.resize(a.size * a.itemsize);
  const size_t dims = a.shape.size();
  std::vector<int> index(dims, 0);
  for (size_t i = 0; i < a.size; ++i) {
    int64_t offset = 0;
    for (size_t d = 0; d < dims; ++d) offset += index[d] * a.strides[d];
    std::memcpy(copy.data() + i * a.itemsize, a.data + offset * a.itemsize, a.itemsize);
    for (size_t d = dims; d-- > 0;) {
      if (++index[d] < a.shape[d]) break;
      index[d] = 0;
    }
  }
  return copy.data();
}

}  // namespace mlxserve_native
