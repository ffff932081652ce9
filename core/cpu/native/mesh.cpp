#include "mesh.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <stdexcept>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "row_major.h"

namespace mlxserve_mesh {
namespace {

// Each message starts with the all-reduce's number and its bytes: ranks that disagree on
// either are out of step, which must fail loudly rather than sum unrelated numbers.
struct Header {
  uint64_t sequence;
  uint64_t nbytes;
};

// A wait first spins this long, yielding the core to any other runnable thread, before it
// sleeps in poll(): most waits (one rank a little behind the other within a layer) end sooner,
// and waking a thread from sleep can cost more than the wait itself (on a virtual CPU that
// halted, hundreds of microseconds).
constexpr auto SPIN = std::chrono::microseconds(5000);

bool would_block(int error) {
  return error == EAGAIN || error == EWOULDBLOCK || error == EINTR;
}

template <typename T>
void sum_in_rank_order(const std::vector<const void*>& parts, void* out, size_t count) {
  auto* o = static_cast<T*>(out);
  std::vector<const T*> p;
  for (const void* part : parts) p.push_back(static_cast<const T*>(part));
  for (size_t i = 0; i < count; ++i) {
    float sum = static_cast<float>(p[0][i]);
    for (size_t r = 1; r < p.size(); ++r) sum += static_cast<float>(p[r][i]);
    o[i] = static_cast<T>(sum);
  }
}

}  // namespace

Mesh::Mesh(int rank, std::vector<int> fds, int silence_ms)
    : rank_(rank), fds_(std::move(fds)), silence_ms_(silence_ms), incoming_(fds_.size()) {
  if (rank_ < 0 || rank_ >= size()) throw std::invalid_argument("[mesh] rank out of range");
  for (int r = 0; r < size(); ++r) {
    if (r != rank_) ::fcntl(fds_[r], F_SETFL, ::fcntl(fds_[r], F_GETFL, 0) | O_NONBLOCK);
  }
}

Mesh::~Mesh() {
  close();
  for (int r = 0; r < size(); ++r) {
    if (r != rank_) ::close(fds_[r]);
  }
}

void Mesh::close() {
  closed_ = true;
  for (int r = 0; r < size(); ++r) {
    if (r != rank_) ::shutdown(fds_[r], SHUT_RDWR);  // wakes a poll() waiting on it
  }
}

void Mesh::fail(const std::string& why) {
  broken_ = why;
  throw std::runtime_error("[mesh] " + why);
}

void Mesh::all_sum(const void* in, void* out, size_t count, mx::Dtype dtype) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) throw std::runtime_error("[mesh] the mesh was closed");
  if (!broken_.empty()) throw std::runtime_error("[mesh] " + broken_);
  const size_t nbytes = count * mx::size_of(dtype);
  const Header header{++sequence_, nbytes};
  outgoing_.resize(sizeof(Header) + nbytes);
  std::memcpy(outgoing_.data(), &header, sizeof(Header));
  std::memcpy(outgoing_.data() + sizeof(Header), in, nbytes);
  exchange(outgoing_.size());
  std::vector<const void*> parts;
  for (int r = 0; r < size(); ++r) {
    if (r == rank_) {
      parts.push_back(in);
      continue;
    }
    Header got;
    std::memcpy(&got, incoming_[r].data(), sizeof(Header));
    if (got.sequence != header.sequence || got.nbytes != header.nbytes) {
      fail("ranks out of step: rank " + std::to_string(r) + " sent all-reduce #" +
           std::to_string(got.sequence) + " of " + std::to_string(got.nbytes) +
           " bytes where rank " + std::to_string(rank_) + " is at #" +
           std::to_string(header.sequence) + " of " + std::to_string(nbytes) + " bytes");
    }
    parts.push_back(incoming_[r].data() + sizeof(Header));
  }
  if (dtype == mx::float32) {
    sum_in_rank_order<float>(parts, out, count);
  } else if (dtype == mx::float16) {
    sum_in_rank_order<mx::float16_t>(parts, out, count);
  } else {
    sum_in_rank_order<mx::bfloat16_t>(parts, out, count);
  }
}

// Sends outgoing_ to every peer and receives each peer's message of the same size, all at
// once (no pair of ranks waits on the other's send), sleeping in poll() until a socket is ready.
void Mesh::exchange(size_t total) {
  const int n = size();
  std::vector<size_t> sent(n, total), got(n, total);
  for (int r = 0; r < n; ++r) {
    if (r == rank_) continue;
    sent[r] = got[r] = 0;
    incoming_[r].resize(total);
  }
  std::vector<pollfd> ready;
  std::vector<int> peer;
  const auto spin_until = std::chrono::steady_clock::now() + SPIN;
  bool spinning = true;
  while (true) {
    ready.clear();
    peer.clear();
    for (int r = 0; r < n; ++r) {
      short events = (sent[r] < total ? POLLOUT : 0) | (got[r] < total ? POLLIN : 0);
      if (events) {
        ready.push_back({fds_[r], events, 0});
        peer.push_back(r);
      }
    }
    if (ready.empty()) return;
    spinning = spinning && std::chrono::steady_clock::now() < spin_until;
    const int count = ::poll(ready.data(), ready.size(), spinning ? 0 : silence_ms_);
    if (count == 0 && spinning) {
      ::sched_yield();
      continue;
    }
    if (count == 0) {
      std::string who;
      for (int r : peer) who += (who.empty() ? "" : ", ") + std::to_string(r);
      fail("no word from rank " + who + " for " + std::to_string(silence_ms_ / 1000.0) +
           " s in an all-reduce");
    }
    if (count < 0) {
      if (errno == EINTR) continue;
      fail(std::string("poll failed: ") + std::strerror(errno));
    }
    for (size_t i = 0; i < ready.size(); ++i) {
      const int r = peer[i];
      const short revents = ready[i].revents;
      const std::string lost = "lost the connection to rank " + std::to_string(r);
      if (revents & POLLIN) {
        ssize_t m = ::recv(fds_[r], incoming_[r].data() + got[r], total - got[r], 0);
        if (m > 0) {
          got[r] += static_cast<size_t>(m);
        } else if (m == 0) {
          fail(lost + " (it closed it)");
        } else if (!would_block(errno)) {
          fail(lost + ": " + std::strerror(errno));
        }
      }
      if (revents & POLLOUT) {
        ssize_t m = ::send(fds_[r], outgoing_.data() + sent[r], total - sent[r], MSG_NOSIGNAL);
        if (m > 0) {
          sent[r] += static_cast<size_t>(m);
        } else if (m < 0 && !would_block(errno)) {
          fail(lost + ": " + std::strerror(errno));
        }
      }
      if ((revents & (POLLERR | POLLNVAL)) || ((revents & POLLHUP) && !(revents & POLLIN))) {
        fail(lost);
      }
    }
  }
}

mx::array all_sum(const mx::array& x, std::shared_ptr<Mesh> mesh, mx::StreamOrDevice s) {
  const auto dtype = x.dtype();
  if (dtype != mx::float32 && dtype != mx::float16 && dtype != mx::bfloat16) {
    throw std::invalid_argument("[mesh] all_sum takes float32, float16 or bfloat16 arrays");
  }
  auto stream = mx::to_stream(s, mx::Device::cpu);
  if (stream.device != mx::Device::cpu) {
    throw std::invalid_argument("[mesh] all_sum runs on a CPU stream");
  }
  return mx::array(x.shape(), dtype, std::make_shared<MeshAllSum>(stream, std::move(mesh)), {x});
}

void MeshAllSum::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& x = inputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(x);
  encoder.set_output_array(out);
  encoder.dispatch([packed = mlxserve_native::describe(x),
                    result = out.data<void>(),
                    count = out.size(),
                    dtype = out.dtype(),
                    mesh = mesh_]() {
    std::vector<uint8_t> copy;
    mesh->all_sum(mlxserve_native::row_major(packed, copy), result, count, dtype);
  });
}

void MeshAllSum::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error("[mesh] all_sum runs on a CPU stream");
}

}  // namespace mlxserve_mesh
