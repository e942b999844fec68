"""Monitoring with trait vectors: the per-token alarm, its data and its calibration."""
