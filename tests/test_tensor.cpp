// test_tensor: written next.
