// mlxserve.core.cpu._qmm: the Python face of the native quantized matmul.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include "dispatch.h"
#include "qmm.h"
#include "thread_pool.h"

namespace nb = nanobind;
using namespace nb::literals;

#ifndef MLXSERVE_NB_VERSION
#define MLXSERVE_NB_VERSION "unknown"
#endif
#ifndef MLXSERVE_MLX_VERSION
#define MLXSERVE_MLX_VERSION "unknown"
#endif

NB_MODULE(_qmm, m) {
  m.doc() = "mlxserve's native CPU quantized matmul (an MLX primitive)";
  m.attr("mlx_version") = MLXSERVE_MLX_VERSION;
  m.attr("nanobind_version") = MLXSERVE_NB_VERSION;
  m.def("isa", [] { return std::string(mlxserve_qmm::best_isa().name); },
        "The instruction set the kernels run with on this CPU.");
  m.def("threads", &mlxserve_qmm::pool_threads, "Threads a call is spread over.");
  m.def("blas_min_rows", &mlxserve_qmm::blas_min_rows,
        "Rows of x from which tiles are dequantized for the BLAS sgemm (0: never).");
  m.def("set_blas_min_rows", &mlxserve_qmm::set_blas_min_rows, "rows"_a,
        "Sets blas_min_rows (0: never use the BLAS); for measurements.");
  m.def(
      "quantized_matmul",
      &mlxserve_qmm::quantized_matmul,
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      nb::kw_only(),
      "group_size"_a,
      "bits"_a,
      "stream"_a = nb::none(),
      "x @ dequantize(w, scales, biases, group_size, bits).T in float32 on the CPU.");
}
