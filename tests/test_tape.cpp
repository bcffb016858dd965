// test_tape: written next.
