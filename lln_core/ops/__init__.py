"""Attention kernels: LLN (lln/), expressive attention (ea/), softmax reference, local branch."""
