"""LLN attention math: kernels, states, moment matching and the paper's instruments."""
