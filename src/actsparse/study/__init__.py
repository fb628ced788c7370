"""The study: sweeps over (target, rule, value, task) points, their store, search and executors, and the studies
built on sweeps (transfer, precision, structure, outliers).
"""
