"""Evaluation, variant comparison, steering sweeps, judge agreement and benchmarks, fed by the
stages' loaders."""
