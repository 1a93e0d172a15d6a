"""Float32 stability of the chunked form on spiky keys, up to a million tokens."""

import pytest
import torch

import lln_core.ops.lln.chunk as chunk_module
from lln_core.ops.lln import lln_attention
from tests.conftest import rel_err

ALPHA, BETA = 2.0, 3.0


def exact_output(q, k, v, t: int) -> torch.Tensor:
    """y_t in float64 from the definition, in log space: weights softmax_s(logsumexp_d(.))."""
    logits = torch.logsumexp(ALPHA * q[t].double() + BETA * k[: t + 1].double(), dim=-1)
    return torch.softmax(logits, dim=0) @ v[: t + 1].double()


def spiky_inputs(seq_len: int, head_dim: int, num_spikes: int, seed: int = 0):
    """Gaussian q, k, v plus keys with |beta k| up to 150 in random dims, and one record spike
    (beta k = 150 far above every earlier key) in the middle of a chunk."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(seq_len, head_dim, generator=gen) for _ in range(3))
    late = torch.randint(seq_len // 2, seq_len, (num_spikes,), generator=gen)
    dims = torch.randint(0, head_dim, (num_spikes,), generator=gen)
    k[late, dims] = (torch.rand(num_spikes, generator=gen) * 300 - 150) / BETA
    record = seq_len // 4 + 37
    k[record, 5] = 150 / BETA
    return q, k, v, record


def run(q, k, v, chunk_size=64):
    y, state = lln_attention(
        q[None, None], k[None, None], v[None, None], ALPHA, BETA, chunk_size=chunk_size
    )
    return y[0, 0], state


def test_record_spike_inside_a_chunk_is_exact(monkeypatch):
    q, k, v, record = spiky_inputs(20_000, 64, num_spikes=50)
    y32, _ = run(q, k, v)
    rows = range(record - 30, record + 3)  # queries of the spike's chunk, before and after it
    for t in rows:
        assert rel_err(y32[t], exact_output(q, k, v, t)) < 1e-4
    # Without the recomputation of underflowed rows, the rows before the spike are lost.
    monkeypatch.setattr(chunk_module, "TINY", 0.0)
    y_plain, _ = run(q, k, v)
    worst = max(rel_err(y_plain[t], exact_output(q, k, v, t)) for t in rows)
    assert not worst < 1e-2


def test_a_million_tokens_in_float32():
    seq_len = 1_000_000
    q, k, v, record = spiky_inputs(seq_len, 32, num_spikes=5_000)
    assert (BETA * k).abs().max() >= 149
    y32, state = run(q, k, v, chunk_size=128)
    assert torch.isfinite(y32).all()
    assert torch.isfinite(state.S).all() and torch.isfinite(state.z).all()
    y64, _ = run(q.double(), k.double(), v.double(), chunk_size=128)
    assert rel_err(y32, y64) < 1e-3
    for t in (record - 1, record, seq_len // 2 + 1, seq_len - 1):
        assert rel_err(y32[t], exact_output(q, k, v, t)) < 1e-3


def test_unstabilised_float32_overflows_on_the_same_keys():
    q, k, v, _ = spiky_inputs(20_000, 32, num_spikes=50)
    phi_q, phi_k = torch.exp(ALPHA * q), torch.exp(BETA * k)  # the textbook feature maps
    den = (phi_q * phi_k.cumsum(dim=0)).sum(-1)
    assert not torch.isfinite(phi_k).all()
    assert not torch.isfinite(den).all()
    y32, _ = run(q, k, v)
    assert torch.isfinite(y32).all()


@pytest.mark.parametrize("chunk_size", [16, 64, 256])
def test_spikes_agree_across_chunk_sizes(chunk_size):
    q, k, v, _ = spiky_inputs(5_000, 32, num_spikes=100, seed=3)
    y_ref, _ = run(q.double(), k.double(), v.double(), chunk_size=64)
    y, _ = run(q, k, v, chunk_size=chunk_size)
    assert rel_err(y, y_ref) < 1e-4


def test_gradients_flow_through_recomputed_rows():
    """Distillation trains alpha/beta through the kernel, spikes included."""
    q, k, v, record = spiky_inputs(2_000, 16, num_spikes=0)
    alpha = torch.tensor(ALPHA, requires_grad=True)
    beta = torch.tensor(BETA, requires_grad=True)
    y, _ = lln_attention(q[None, None], k[None, None], v[None, None], alpha, beta)
    y[0, 0, record - 5 : record + 5].sum().backward()
    assert torch.isfinite(alpha.grad) and torch.isfinite(beta.grad)
    assert alpha.grad != 0 and beta.grad != 0
