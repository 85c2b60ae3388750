"""LMO-DP configs (optimised non-Gaussian noise)."""
