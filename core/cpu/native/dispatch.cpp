#include "dispatch.h"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "thread_pool.h"

namespace mlxserve_qmm {
namespace {

using sgemm_fn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*,
                          int, float, float*, int);
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// The process's cblas_sgemm (mkl when mlxserve loaded it under MLX, else the BLAS libmlx
// links), looked up at run time so the extension links no BLAS of its own.
sgemm_fn find_sgemm() {
  static sgemm_fn fn = reinterpret_cast<sgemm_fn>(dlsym(RTLD_DEFAULT, "cblas_sgemm"));
  return fn;
}

const Isa& choose_isa() {
  const char* forced = std::getenv("MLXSERVE_QMM_ISA");
  const bool force = forced != nullptr && *forced != '\0';
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f");
  if (force && std::strcmp(forced, "scalar") == 0) return isa_scalar();
  if (force && std::strcmp(forced, "avx2") == 0 && avx2) return isa_avx2();
  if (avx512) return isa_avx512();
  if (avx2) return isa_avx2();
#elif defined(__aarch64__)
  if (force && std::strcmp(forced, "scalar") == 0) return isa_scalar();
  return isa_neon();
#endif
  (void)force;
  return isa_scalar();
}

// Weight bytes below which a call runs on the calling thread alone: waking a worker costs
// more than it saves.
constexpr long kMinParallelBytes = 48 * 1024;

// From this many rows of x, dequantized tiles and the BLAS beat the fused kernel (measured:
// docs/performance.md, "Quantized matmul on the CPU").
constexpr int kDefaultBlasMinRows = 32;

}  // namespace

const Isa& best_isa() {
  static const Isa& isa = choose_isa();
  return isa;
}

void permute_x(const float* x, int M, int K, int width, float* dst) {
  const int chunk = 2 * width;
  for (long r = 0; r < static_cast<long>(M) * K; r += K) {
    for (int c = 0; c < K; c += chunk) {
      const float* s = x + r + c;
      float* d = dst + r + c;
      for (int i = 0; i < width; i++) {
        d[i] = s[2 * i];
        d[width + i] = s[2 * i + 1];
      }
    }
  }
}

bool have_blas() { return find_sgemm() != nullptr; }

namespace {
int initial_blas_min_rows() {
  const char* v = std::getenv("MLXSERVE_QMM_BLAS_MIN_ROWS");
  if (v != nullptr && *v != '\0') return std::max(0, std::atoi(v));
  return kDefaultBlasMinRows;
}
std::atomic<int> g_blas_min_rows{initial_blas_min_rows()};
}  // namespace

int blas_min_rows() { return have_blas() ? g_blas_min_rows.load(std::memory_order_relaxed) : 0; }

void set_blas_min_rows(int rows) { g_blas_min_rows.store(std::max(0, rows)); }

void run(const Problem& in) {
  const Isa& isa = best_isa();
  Problem p = in;
  const int threads = pool_threads();
  const long weight_bytes = static_cast<long>(p.N) * p.K * p.bits / 8;
  const int min_rows = blas_min_rows();

  if (min_rows > 0 && p.M >= min_rows) {
    // Many rows: compute-bound. Dequantize tiles of rows to float32 (L2-sized) and let the
    // BLAS multiply them, each part on its own rows. 4 bits: the tiles come out in the order
    // the nibbles unpack in, so x is permuted to match (the sum over K does not care).
    std::vector<float> xp;
    if (p.bits == 4) {
      xp.resize(static_cast<size_t>(p.M) * p.K);
      permute_x(p.x, p.M, p.K, isa.width, xp.data());
      p.x = xp.data();
    }
    sgemm_fn sgemm = find_sgemm();
    const int tile = std::max(8, std::min(256, (128 * 1024) / p.K));
    const int tiles = (p.N + tile - 1) / tile;
    pool_run(tiles, [&](int t) {
      thread_local std::vector<float> buf;
      const int n0 = t * tile;
      const int n1 = std::min(p.N, n0 + tile);
      buf.resize(static_cast<size_t>(n1 - n0) * p.K);
      isa.dequantize(p, n0, n1, buf.data());
      sgemm(kRowMajor, kNoTrans, kTrans, p.M, n1 - n0, p.K, 1.0f, p.x, p.K, buf.data(), p.K,
            0.0f, p.out + n0, p.N);
    });
    return;
  }

  std::vector<float> xsum;
  if (p.M == 1) {
    // One row: the kernel sums scale * (q . x) and bias * (the sum of x) per group.
    const int groups = p.K / p.group_size;
    xsum.assign(groups, 0.0f);
    for (int g = 0; g < groups; g++) {
      float s = 0.0f;
      for (int k = 0; k < p.group_size; k++) s += p.x[g * p.group_size + k];
      xsum[g] = s;
    }
    p.xsum = xsum.data();
  }
  std::vector<float> xp;
  if (p.bits == 4) {
    xp.resize(static_cast<size_t>(p.M) * p.K);
    permute_x(p.x, p.M, p.K, isa.width, xp.data());
    p.x = xp.data();
  }
  const long work = weight_bytes * ((p.M + 3) / 4);
  const int parts = (threads == 1 || work < kMinParallelBytes)
                        ? 1
                        : std::min(p.N, threads * (p.N >= 64 * threads ? 4 : 1));
  const int per = (p.N + parts - 1) / parts;
  pool_run(parts, [&](int i) {
    const int n0 = i * per;
    const int n1 = std::min(p.N, n0 + per);
    if (n0 < n1) isa.rows(p, n0, n1);
  });
}

}  // namespace mlxserve_qmm
