"""Expressive attention: chunked == recurrent == naive (output and final state), the feature
identity, the normalisation, dtypes, shape errors, and a 100k-token float32 run."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from lln_core.ops.ea.chunk import DEFAULT_EPS, ea_attention, ea_features, num_ea_features
from lln_core.ops.ea.naive import naive_ea_attention
from lln_core.ops.ea.recurrent import ea_step
from lln_core.state import EAState

F64 = torch.float64
TOL64 = 1e-10


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These tensors are tiny: on a shared CPU, intra-op threads only add waiting (10x here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def make_qkv(
    batch: int,
    num_kv_heads: int,
    group: int,
    seq_len: int,
    head_dim: int = 8,
    v_dim: int = 6,
    dtype: torch.dtype = F64,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """q [B, Hkv*group, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv]."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_kv_heads * group, seq_len, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, num_kv_heads, seq_len, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, num_kv_heads, seq_len, v_dim, generator=gen, dtype=dtype)
    return q, k, v


def prefix_state(batch: int, num_kv_heads: int, head_dim: int = 8, v_dim: int = 6) -> EAState:
    """A reachable state: the one after 11 random earlier tokens."""
    q, k, v = make_qkv(batch, num_kv_heads, 1, 11, head_dim, v_dim, seed=123)
    return naive_ea_attention(q, k, v)[1]


def run_recurrent(
    q: Tensor, k: Tensor, v: Tensor, state: EAState | None
) -> tuple[Tensor, EAState | None]:
    outputs = []
    for t in range(q.shape[2]):
        y, state = ea_step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
        outputs.append(y)
    return torch.cat(outputs, dim=2), state


def assert_states_close(got: EAState, want: EAState, tol: float) -> None:
    assert got.S.shape == want.S.shape and got.z.shape == want.z.shape
    assert rel_err(got.S, want.S) < tol
    assert rel_err(got.z, want.z) < tol
    assert torch.equal(got.num_tokens, want.num_tokens)


@pytest.mark.parametrize("head_dim", [1, 2, 7, 64])
def test_features_give_squared_dot_product(head_dim: int) -> None:
    gen = torch.Generator().manual_seed(head_dim)
    x = torch.randn(5, 3, head_dim, generator=gen, dtype=F64)
    y = torch.randn(5, 3, head_dim, generator=gen, dtype=F64)
    phi_x, phi_y = ea_features(x), ea_features(y)
    assert (
        phi_x.shape == (5, 3, num_ea_features(head_dim)) == (5, 3, head_dim * (head_dim + 1) // 2)
    )
    want = (x * y).sum(-1).square()
    assert rel_err((phi_x * phi_y).sum(-1), want) < 1e-13
    assert EAState.empty(1, 1, head_dim).z.shape[-1] == num_ea_features(head_dim)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
@pytest.mark.parametrize("seq_len", [1, 5, 16, 37])
def test_chunked_matches_naive(seq_len: int, chunk_size: int, group: int, with_state: bool) -> None:
    q, k, v = make_qkv(2, 2, group, seq_len)
    state = prefix_state(2, 2) if with_state else None
    y_naive, s_naive = naive_ea_attention(q, k, v, state=state)
    y_chunk, s_chunk = ea_attention(q, k, v, state=state, chunk_size=chunk_size)
    assert y_chunk.shape == (2, 2 * group, seq_len, 6) and y_chunk.dtype == F64
    assert rel_err(y_chunk, y_naive) < TOL64
    assert_states_close(s_chunk, s_naive, TOL64)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("seq_len", [1, 9, 37])
def test_recurrent_matches_naive(seq_len: int, group: int, with_state: bool) -> None:
    q, k, v = make_qkv(2, 2, group, seq_len, seed=1)
    state = prefix_state(2, 2) if with_state else None
    y_naive, s_naive = naive_ea_attention(q, k, v, state=state)
    y_rec, s_rec = run_recurrent(q, k, v, state)
    assert rel_err(y_rec, y_naive) < TOL64
    assert_states_close(s_rec, s_naive, TOL64)


@pytest.mark.parametrize("splits", [(0,), (1,), (13,), (5, 6, 30), (44,), (3, 20, 21, 45)])
@pytest.mark.parametrize("group", [1, 3])
def test_prefill_split_anywhere(splits: tuple[int, ...], group: int) -> None:
    q, k, v = make_qkv(2, 1, group, 45, seed=2)
    y_whole, s_whole = ea_attention(q, k, v, chunk_size=8)
    bounds = [0, *splits, 45]
    state, outputs = None, []
    for lo, hi in itertools.pairwise(bounds):
        part = slice(lo, hi)
        qkv = (q[:, :, part], k[:, :, part], v[:, :, part])
        y, state = ea_attention(*qkv, state=state, chunk_size=8)
        outputs.append(y)
    assert rel_err(torch.cat(outputs, dim=2), y_whole) < TOL64
    assert_states_close(state, s_whole, TOL64)


def test_prefill_then_decode_matches_one_prefill() -> None:
    q, k, v = make_qkv(3, 2, 3, 30, seed=3)
    y_whole, s_whole = ea_attention(q, k, v, chunk_size=16)
    y_pre, state = ea_attention(q[:, :, :21], k[:, :, :21], v[:, :, :21], chunk_size=16)
    y_dec, state = run_recurrent(q[:, :, 21:], k[:, :, 21:], v[:, :, 21:], state)
    assert rel_err(torch.cat([y_pre, y_dec], dim=2), y_whole) < TOL64
    assert_states_close(state, s_whole, TOL64)
    assert state.num_tokens.tolist() == [30, 30, 30]


def test_query_heads_of_a_group_share_their_kv_head() -> None:
    q, k, v = make_qkv(2, 2, 3, 12, seed=4)
    y_gqa, _ = ea_attention(q, k, v, chunk_size=5)
    k_rep, v_rep = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
    y_mha, _ = naive_ea_attention(q, k_rep, v_rep)
    assert rel_err(y_gqa, y_mha) < TOL64


def test_attention_weights_are_normalised_with_eps() -> None:
    """With v = identity over positions, y_t is row t of the attention matrix."""
    seq_len, head_dim, eps = 10, 4, 0.3
    q, k, _ = make_qkv(1, 1, 1, seq_len, head_dim, seed=5)
    v = torch.eye(seq_len, dtype=F64).expand(1, 1, seq_len, seq_len)
    want = torch.zeros(seq_len, seq_len, dtype=F64)
    row_sums = torch.zeros(seq_len, dtype=F64)
    for t in range(seq_len):
        squares = [float(q[0, 0, t] @ k[0, 0, s]) ** 2 / head_dim for s in range(t + 1)]
        for s, sq in enumerate(squares):
            want[t, s] = sq / (eps + sum(squares))
        row_sums[t] = 1.0 - eps / (eps + sum(squares))
    for fn in (naive_ea_attention, ea_attention):
        weights = fn(q, k, v, eps=eps)[0][0, 0]
        assert rel_err(weights, want) < TOL64
        assert rel_err(weights.sum(-1), row_sums) < TOL64
        assert bool((weights.sum(-1) < 1.0).all())


def test_zero_query_gives_zero_output_not_nan() -> None:
    q, k, v = make_qkv(1, 1, 1, 6, seed=6)
    q[:, :, 3] = 0.0
    for y in (naive_ea_attention(q, k, v)[0], ea_attention(q, k, v, chunk_size=4)[0]):
        assert torch.isfinite(y).all()
        assert torch.equal(y[:, :, 3], torch.zeros_like(y[:, :, 3]))


def test_float32_matches_float64() -> None:
    q, k, v = make_qkv(2, 2, 3, 40, head_dim=16, v_dim=16, dtype=torch.float32, seed=7)
    state32 = naive_ea_attention(*make_qkv(2, 2, 1, 7, 16, 16, torch.float32, seed=8))[1]
    state64 = EAState(S=state32.S.double(), z=state32.z.double(), num_tokens=state32.num_tokens)
    y64, s64 = naive_ea_attention(q.double(), k.double(), v.double(), state=state64)
    results = {
        "naive": naive_ea_attention(q, k, v, state=state32),
        "chunk": ea_attention(q, k, v, state=state32, chunk_size=16),
        "recurrent": run_recurrent(q, k, v, state32),
    }
    for name, (y32, s32) in results.items():
        assert y32.dtype == torch.float32 and s32.S.dtype == torch.float32, name
        assert rel_err(y32, y64) < 1e-4, name
        assert_states_close(s32, s64, 1e-4)


def test_half_precision_input_keeps_float32_state() -> None:
    q, k, v = make_qkv(1, 1, 2, 20, dtype=torch.bfloat16, seed=9)
    y64, _ = naive_ea_attention(q.double(), k.double(), v.double())
    y, state = ea_attention(q, k, v, chunk_size=8)
    assert y.dtype == torch.bfloat16 and state.S.dtype == state.z.dtype == torch.float32
    assert rel_err(y, y64) < 2e-2
    y_step, step_state = ea_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], None)
    assert y_step.dtype == torch.bfloat16 and step_state.S.dtype == torch.float32


def test_input_state_is_not_modified() -> None:
    state = prefix_state(1, 1)
    snapshot = state.clone()
    q, k, v = make_qkv(1, 1, 1, 5, seed=10)
    ea_attention(q, k, v, state=state)
    naive_ea_attention(q, k, v, state=state)
    ea_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)
    for got, want in zip(state._tensors(), snapshot._tensors(), strict=True):
        assert torch.equal(got, want)


def test_empty_sequence_returns_state_unchanged() -> None:
    state = prefix_state(2, 1)
    q, k, v = make_qkv(2, 1, 3, 0)
    for fn in (naive_ea_attention, ea_attention):
        y, new_state = fn(q, k, v, state=state)
        assert y.shape == (2, 3, 0, 6)
        assert_states_close(new_state, state, 1e-15)


def _bad_inputs(case: str) -> tuple[Tensor, Tensor, Tensor, EAState | None]:
    """One-token inputs (so every form can be called) broken in one way."""
    q, k, v = make_qkv(2, 2, 2, 1)
    state = None
    if case == "q_not_4d":
        q = q[0]
    elif case == "k_head_dim":
        k = k[..., :5]
    elif case == "v_seq_len":
        v = torch.cat([v, v], dim=2)
    elif case == "heads_not_multiple":
        q = q[:, :3]
    elif case == "k_v_heads":
        v = v[:, :1]
    elif case == "batch":
        k, v = k[:1], v[:1]
    elif case == "integer_q":
        q = q.long()
    elif case == "state_head_dim":
        state = EAState.empty(2, 2, 7, v_dim=6, dtype=F64)
    elif case == "state_batch":
        state = EAState.empty(3, 2, 8, v_dim=6, dtype=F64)
    elif case == "state_v_dim":
        state = EAState.empty(2, 2, 8, v_dim=8, dtype=F64)
    return q, k, v, state


@pytest.mark.parametrize(
    "case",
    [
        "q_not_4d",
        "k_head_dim",
        "v_seq_len",
        "heads_not_multiple",
        "k_v_heads",
        "batch",
        "integer_q",
        "state_head_dim",
        "state_batch",
        "state_v_dim",
    ],
)
def test_bad_shapes_raise_value_error(case: str) -> None:
    q, k, v, state = _bad_inputs(case)
    with pytest.raises(ValueError):
        naive_ea_attention(q, k, v, state=state)
    with pytest.raises(ValueError):
        ea_attention(q, k, v, state=state)
    with pytest.raises(ValueError):
        ea_step(q, k, v, state)


def test_bad_arguments_raise_value_error() -> None:
    q, k, v = make_qkv(1, 1, 1, 2)
    with pytest.raises(ValueError, match="T = 1"):
        ea_step(q, k, v, None)
    with pytest.raises(ValueError, match="chunk_size"):
        ea_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="eps"):
        ea_attention(q, k, v, eps=-1.0)
    assert DEFAULT_EPS > 0


def test_100k_tokens_float32_stays_finite_and_matches_float64() -> None:
    seq_len = 100_000
    q, k, v = make_qkv(1, 1, 2, seq_len, head_dim=8, v_dim=8, dtype=torch.float32, seed=11)
    y32, s32 = ea_attention(q, k, v, chunk_size=256)
    y64, s64 = ea_attention(q.double(), k.double(), v.double(), chunk_size=256)
    assert torch.isfinite(y32).all() and torch.isfinite(s32.S).all()
    assert rel_err(y32, y64) < 1e-5
    # worst token: error relative to that token's own output scale
    worst = ((y32.double() - y64).abs().amax(-1) / y64.abs().amax(-1)).max().item()
    assert worst < 1e-4
    assert_states_close(s32, s64, 1e-5)
    assert s32.num_tokens.item() == seq_len
    assert math.isfinite(s32.z.abs().max().item())
