import math

import torch

from lln_core.ops.softmax import LocalSpec, local_softmax_parts, softmax_attention
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


def test_local_parts_fused_equal_unfused(gen):
    """The window's fused CPU kernel (no autograd) and the elementwise path (autograd) agree
    over two chunks with padding; a row with no key yet sees nothing (den 0) in both."""
    spec = LocalSpec("window", 5, num_sinks=2)
    results = []
    for grad in (False, True):
        cache = spec.empty_cache(2, 2, 8, dtype=torch.float64)
        num_tokens = torch.tensor([0, 0])
        parts = []
        for seq_len, lengths in ((7, torch.tensor([7, 0])), (9, torch.tensor([9, 4]))):
            g = torch.Generator().manual_seed(seq_len)
            q = torch.randn(2, 2, 3, seq_len, 8, generator=g, dtype=torch.float64)
            k, v = (torch.randn(2, 2, seq_len, 8, generator=g, dtype=torch.float64) for _ in "kv")
            valid = torch.arange(seq_len)[None] < lengths[:, None]
            with torch.enable_grad():
                num, den, log_scale, cache = local_softmax_parts(
                    q.requires_grad_(grad), k, v, cache, num_tokens, spec, scale=0.35,
                    valid=valid,
                )  # fmt: skip
            parts.append((num.detach() * log_scale.detach().exp()[..., None],
                          den.detach() * log_scale.detach().exp(), den.detach() == 0))  # fmt: skip
            num_tokens = num_tokens + lengths
        results.append(parts)
    for fused, plain in zip(*results, strict=True):
        assert torch.equal(fused[2], plain[2])
        assert rel_err(fused[0], plain[0]) < 1e-12 and rel_err(fused[1], plain[1]) < 1e-12
    assert bool(results[0][0][2][1].all())  # the empty row of the first chunk sees nothing
