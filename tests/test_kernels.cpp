// test_kernels: written next.
