import math

import torch

from lln_core.ops.softmax import softmax_attention
from tests.conftest import randn, rel_err


def loop_reference(q, k, v):
    """Per head, per query: the textbook formula with explicit loops (float64)."""
    batch, num_q_heads, seq_len, head_dim = q.shape
    group = num_q_heads // k.shape[1]
    y = torch.zeros(batch, num_q_heads, seq_len, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(num_q_heads):
            for t in range(seq_len):
                scores = k[b, h // group, : t + 1] @ q[b, h, t] / math.sqrt(head_dim)
                y[b, h, t] = torch.softmax(scores, 0) @ v[b, h // group, : t + 1]
    return y


def test_causal_gqa_matches_loops(gen):
    q, k, v = randn(gen, 2, 6, 9, 4), randn(gen, 2, 2, 9, 4), randn(gen, 2, 2, 9, 5)
    assert rel_err(softmax_attention(q, k, v), loop_reference(q, k, v)) < 1e-12


def test_kv_cache_offset(gen):
    """Queries of the last tokens against the whole cache equal the last rows of the full run."""
    q, k, v = randn(gen, 1, 4, 20, 8), randn(gen, 1, 2, 20, 8), randn(gen, 1, 2, 20, 8)
    full = softmax_attention(q, k, v)
    tail = softmax_attention(q[:, :, -3:], k, v)
    assert rel_err(tail, full[:, :, -3:]) < 1e-12
