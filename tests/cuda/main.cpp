// doctest's main for the GPU tests: without a usable CUDA device it says so and exits with 77, which
// ctest reports as skipped (SKIP_RETURN_CODE), never as passed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "autodiff/cuda/device.hpp"

int main(int argc, char** argv) {
    if (!autodiff::cuda_available()) {
        std::printf("SKIPPED: no CUDA device found; the cuda-labelled tests need a GPU (tools/test_cuda.sh)\n");
        return 77;
    }
    std::printf("cuda device: %s\n", autodiff::cuda_device_name().c_str());
    doctest::Context context(argc, argv);
    return context.run();
}
