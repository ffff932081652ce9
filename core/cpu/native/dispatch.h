// One quantized matmul, start to end: the instruction set, x's preparation, the split of the
// output features over the thread pool, and the BLAS route for many rows.
#pragma once

#include "kernels.h"

namespace mlxserve_qmm {

// Computes p.out (x in natural order; p.x is replaced by a prepared copy where needed).
void run(const Problem& p);

// Rows of x from which run() dequantizes tiles and calls the BLAS sgemm (0: never). Set by
// MLXSERVE_QMM_BLAS_MIN_ROWS at load or set_blas_min_rows (the benchmark); 0 disables it.
int blas_min_rows();
void set_blas_min_rows(int rows);

// Whether a BLAS sgemm was found in the process.
bool have_blas();

}  // namespace mlxserve_qmm
