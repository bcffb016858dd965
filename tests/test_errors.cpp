// test_errors: written next.
