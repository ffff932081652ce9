// mlxserve.core.cpu._qmm: the Python face of the native quantized matmul.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include <map>
#include <memory>
#include <mutex>

#include "dispatch.h"
#include "mesh.h"
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

namespace {

// Meshes by handle: Python holds an integer, never the C++ object, so a task on an MLX
// stream never drops the last reference to a Python object without the GIL.
std::mutex meshes_lock;
std::map<int, std::shared_ptr<mlxserve_mesh::Mesh>> meshes;
int next_mesh = 1;

std::shared_ptr<mlxserve_mesh::Mesh> mesh_of(int handle) {
  std::lock_guard<std::mutex> lock(meshes_lock);
  auto found = meshes.find(handle);
  if (found == meshes.end()) throw std::invalid_argument("[mesh] no open mesh has this handle");
  return found->second;
}

}  // namespace

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
  m.def(
      "open_mesh",
      [](int rank, std::vector<int> fds, int silence_ms) {
        auto mesh = std::make_shared<mlxserve_mesh::Mesh>(rank, std::move(fds), silence_ms);
        std::lock_guard<std::mutex> lock(meshes_lock);
        meshes[next_mesh] = std::move(mesh);
        return next_mesh++;
      },
      "rank"_a,
      "fds"_a,
      "silence_ms"_a,
      "A mesh over connected sockets (fds[r] to rank r; it owns them); returns its handle.");
  m.def(
      "close_mesh",
      [](int handle) {
        std::shared_ptr<mlxserve_mesh::Mesh> mesh;
        {
          std::lock_guard<std::mutex> lock(meshes_lock);
          auto found = meshes.find(handle);
          if (found == meshes.end()) return;
          mesh = std::move(found->second);
          meshes.erase(found);
        }
        mesh->close();
      },
      "handle"_a,
      "Closes a mesh's connections: an all-reduce waiting on it fails at once.");
  m.def(
      "mesh_all_sum",
      [](const mlx::core::array& x, int handle) {
        return mlxserve_mesh::all_sum(x, mesh_of(handle));
      },
      "x"_a,
      "handle"_a,
      "The sum of x over the mesh's ranks, in rank order (lazy, like mx.distributed.all_sum).");
}
