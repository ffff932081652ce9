// The ranks of one tensor-parallel group joined by a full mesh of TCP connections, and the
// MLX primitive that sums an array over them (mlxserve.core.distributed.allreduce).
//
// Every rank sends its array to every other rank and sums what it receives in rank order, so
// all ranks get the same bits. The exchange runs on the MLX stream that asked for it, which has
// nothing else to do meanwhile: a wait spins briefly, yielding to any other runnable thread,
// then sleeps in poll(). MLX's ring backend hands each message to other threads, and its
// socket threads spin without yielding for as long as they wait, which on a rank with one core
// takes the core from the rank's own computation.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlxserve_mesh {

namespace mx = mlx::core;

class Mesh {
 public:
  // fds[r]: a connected TCP socket to rank r (fds[rank] is ignored); the mesh owns them.
  // silence_ms: how long an all-reduce waits for a peer that sends nothing before it fails.
  Mesh(int rank, std::vector<int> fds, int silence_ms);
  ~Mesh();
  Mesh(const Mesh&) = delete;
  Mesh& operator=(const Mesh&) = delete;

  int rank() const { return rank_; }
  int size() const { return static_cast<int>(fds_.size()); }

  // out[i] = the sum over ranks, in rank order, of each rank's in[i] (float32 accumulation).
  // Throws std::runtime_error starting with "[mesh]" when a peer is gone or silent.
  void all_sum(const void* in, void* out, size_t count, mx::Dtype dtype);
  // Shuts every connection down (from any thread): a call waiting now or later fails at once.
  void close();

 private:
  void exchange(size_t nbytes);
  [[noreturn]] void fail(const std::string& why);

  int rank_;
  std::vector<int> fds_;
  int silence_ms_;
  uint64_t sequence_ = 0;
  std::vector<char> outgoing_;
  std::vector<std::vector<char>> incoming_;
  std::string broken_;
  std::atomic<bool> closed_ = false;
  std::mutex mutex_;
};

// The sum of x over the mesh's ranks (float32, float16 or bfloat16), on a CPU stream.
mx::array all_sum(const mx::array& x, std::shared_ptr<Mesh> mesh, mx::StreamOrDevice s = {});

class MeshAllSum : public mx::UnaryPrimitive {
 public:
  MeshAllSum(mx::Stream stream, std::shared_ptr<Mesh> mesh)
      : mx::UnaryPrimitive(stream), mesh_(std::move(mesh)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  const char* name() const override { return "MlxserveMeshAllSum"; }
  // Two all-reduces are never one: each is a message every rank must send.
  bool is_equivalent(const mx::Primitive&) const override { return false; }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  std::shared_ptr<Mesh> mesh_;
};

}  // namespace mlxserve_mesh
