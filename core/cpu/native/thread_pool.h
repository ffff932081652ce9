// A small persistent pool that runs the parts of one job at a time over its workers and the
// calling thread. Workers spin briefly for the next job (a decode step makes hundreds of
// short calls), then sleep on a condition variable.
#pragma once

#include <functional>

namespace mlxserve_qmm {

// Threads (the caller included) a job is spread over: MLXSERVE_QMM_THREADS if set, else the
// CPUs this process may run on.
int pool_threads();

// Runs fn(0) .. fn(parts - 1) and returns when all are done. The calling thread takes parts
// itself. While another thread's job holds the pool, the caller runs all parts alone (so
// concurrent streams never wait on each other and never deadlock).
void pool_run(int parts, const std::function<void(int)>& fn);

}  // namespace mlxserve_qmm
