// test_nodes: written next.
