"""Fast paths (CPU and Triton) of the rules and of sparse FFN decoding, each checked against a
pure-PyTorch reference in the tests."""
