"""Triton kernels and their launchers (no op registration here: see credit_ops/_triton_ops.py)."""
