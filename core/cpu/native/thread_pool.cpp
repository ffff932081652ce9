#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define QMM_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define QMM_PAUSE() __asm__ __volatile__("yield")
#else
#define QMM_PAUSE() ((void)0)
#endif

namespace mlxserve_qmm {
namespace {

// The job state in one word, so a claim can never mix two jobs: generation (32 bits), parts
// (16 bits), next part to hand out (16 bits).
constexpr uint64_t make_state(uint64_t gen, uint64_t parts, uint64_t next) {
  return gen << 32 | parts << 16 | next;
}
constexpr uint32_t gen_of(uint64_t s) { return static_cast<uint32_t>(s >> 32); }
constexpr int parts_of(uint64_t s) { return static_cast<int>((s >> 16) & 0xffff); }
constexpr int next_of(uint64_t s) { return static_cast<int>(s & 0xffff); }

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  long n = std::strtol(v, &end, 10);
  return (end != v && n > 0 && n < 4096) ? static_cast<int>(n) : fallback;
}

int allowed_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

class Pool {
 public:
  explicit Pool(int threads) : threads_(threads) {
    spin_us_ = env_int("MLXSERVE_QMM_SPIN_US", 200);
    for (int i = 1; i < threads_; i++) {
      std::thread([this] { work(); }).detach();
    }
  }

  int threads() const { return threads_; }

  void run(int parts, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || threads_ == 1 || parts <= 1) {
      for (int i = 0; i < parts; i++) fn(i);
      return;
    }
    fn_ = &fn;
    remaining_.store(parts, std::memory_order_relaxed);
    const uint32_t gen = gen_of(state_.load(std::memory_order_relaxed)) + 1;
    state_.store(make_state(gen, parts, 0), std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lock(sleep_); }
      wake_.notify_all();
    }
    claim_parts(gen);
    // Wait for the parts workers are still running; yield once it takes a while, so that a
    // worker sharing this core (a loaded machine) gets it.
    for (int i = 0; remaining_.load(std::memory_order_acquire) != 0; i++) {
      if (i < 4096) {
        QMM_PAUSE();
      } else {
        sched_yield();
      }
    }
  }

 private:
  // Takes and runs parts of job `gen` until none is left.
  void claim_parts(uint32_t gen) {
    uint64_t s = state_.load(std::memory_order_acquire);
    while (gen_of(s) == gen && next_of(s) < parts_of(s)) {
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
        (*fn_)(next_of(s));
        remaining_.fetch_sub(1, std::memory_order_acq_rel);
        s = state_.load(std::memory_order_acquire);
      }
    }
  }

  void work() {
    uint32_t seen = gen_of(state_.load(std::memory_order_acquire));
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
      uint32_t gen = seen;
      for (int i = 0;; i++) {
        gen = gen_of(state_.load(std::memory_order_acquire));
        if (gen != seen) break;
        QMM_PAUSE();
        if ((i & 255) == 255) {
          if (std::chrono::steady_clock::now() > until) break;
          sched_yield();  // spin politely: other threads on this core go first
        }
      }
      if (gen == seen) {
        std::unique_lock<std::mutex> lock(sleep_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        wake_.wait(lock, [&] { return gen_of(state_.load(std::memory_order_seq_cst)) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        gen = gen_of(state_.load(std::memory_order_acquire));
      }
      seen = gen;
      claim_parts(gen);
    }
  }

  const int threads_;
  int spin_us_;
  std::mutex busy_;  // one job at a time
  std::mutex sleep_;
  std::condition_variable wake_;
  std::atomic<int> sleepers_{0};
  std::atomic<uint64_t> state_{0};
  std::atomic<int> remaining_{0};
  const std::function<void(int)>* fn_ = nullptr;
};

// Never destroyed: its detached workers sleep through interpreter exit. A forked child gets a
// new pool (the parent's workers do not exist there).
std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_atfork;

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return *p;
  static std::mutex create;
  std::lock_guard<std::mutex> lock(create);
  std::call_once(g_atfork, [] {
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr, std::memory_order_release); });
  });
  p = g_pool.load(std::memory_order_acquire);
  if (p == nullptr) {
    p = new Pool(pool_threads());
    g_pool.store(p, std::memory_order_release);
  }
  return *p;
}

}  // namespace

int pool_threads() { return env_int("MLXSERVE_QMM_THREADS", allowed_cpus()); }

void pool_run(int parts, const std::function<void(int)>& fn) { pool().run(parts, fn); }

}  // namespace mlxserve_qmm
