#include "autodiff/parallel.hpp"

#include <Eigen/Core>

#include "autodiff/error.hpp"

namespace autodiff {

void set_num_threads(int n) {
    if (n < 1) fail("set_num_threads", "thread count must be >= 1, got {}", n);
#if defined(_OPENMP)
    omp_set_num_threads(n);
#endif
    Eigen::setNbThreads(n);
}

int num_threads() {
#if defined(_OPENMP)
    return omp_get_max_threads();
#else
    return 1;
#endif
}

}  // namespace autodiff
