"""Turning sparsity into speed: calibration of static thresholds, `accelerate` (sparse decode through the kernels),
the static decoder and the benchmark harness.
"""
