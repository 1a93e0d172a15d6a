import torch

from lln_core.ops.lln import lln_attention
from lln_core.state import EAState, LLNState, LocalKV, kv_cache_bytes


def test_nbytes_counts_every_tensor():
    state = LLNState.empty(2, 3, 64)
    # S + z + m in float32, num_tokens int64
    assert state.nbytes == 2 * 3 * (64 * 64 + 64 + 64) * 4 + 2 * 8
    local = LocalKV.empty(2, 3, 64, ring_size=64, num_sinks=4)
    with_local = LLNState.empty(2, 3, 64, local=local)
    assert with_local.nbytes == state.nbytes + local.nbytes
    assert local.nbytes == 2 * (2 * 3 * 68 * 64 * 4) + 2 * 68 * 8
    assert EAState.empty(1, 1, 64).S.shape == (1, 1, 2080, 64)


def test_select_scatter_and_clone_round_trip():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 10, 8, generator=gen) for _ in range(3))
    _, state = lln_attention(q, k, v, 1.0, 1.0)
    picked = state.index_select(torch.tensor([2, 0]))
    assert torch.equal(picked.S[0], state.S[2]) and torch.equal(picked.m[1], state.m[0])
    pool = LLNState.empty(5, 2, 8)
    pool.index_copy_(torch.tensor([4, 1]), picked)
    assert torch.equal(pool.S[4], state.S[2]) and torch.equal(pool.z[1], state.z[0])
    assert torch.equal(pool.num_tokens, torch.tensor([0, 10, 0, 0, 10]))
    copy = pool.clone()
    copy.S.zero_()
    assert pool.S.abs().sum() > 0


def test_state_size_does_not_grow_with_context():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 5000, 64, generator=gen) for _ in range(3))
    _, short = lln_attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], 1.0, 1.0)
    _, long = lln_attention(q, k, v, 1.0, 1.0)
    assert short.nbytes == long.nbytes


def test_default_model_numbers_from_the_design():
    # SmolLM2-135M: 30 layers, 3 KV heads, head dim 64: bf16 KV cache 23,040 bytes per token
    assert kv_cache_bytes(1, 30, 3, 64) == 23_040
    per_layer = LLNState.empty(1, 3, 64).nbytes - 8  # without the token counter
    assert abs(30 * per_layer / 2**20 - 1.45) < 0.01
