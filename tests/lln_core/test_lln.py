"""Causal LLN attention: chunked == recurrent == naive, in float64 and float32."""

import pytest
import torch

from lln_core.ops.lln import lln_attention, lln_step, naive_lln_attention
from lln_core.state import LLNState
from tests.conftest import feature_maps, randn, rel_err

ALPHA = (1.3, 0.7, 2.0)  # per KV head, cut to Hkv
BETA = (0.9, 1.6, 0.5)


def make_inputs(gen, batch, num_q_heads, num_kv_heads, seq_len, head_dim=8, dtype=torch.float64):
    q = randn(gen, batch, num_q_heads, seq_len, head_dim, dtype=dtype)
    k = randn(gen, batch, num_kv_heads, seq_len, head_dim, dtype=dtype)
    v = randn(gen, batch, num_kv_heads, seq_len, head_dim + 2, dtype=dtype)
    alpha = torch.tensor(ALPHA[:num_kv_heads], dtype=dtype)
    beta = torch.tensor(BETA[:num_kv_heads], dtype=dtype)
    return q, k, v, alpha, beta


def run_recurrent(q, k, v, alpha, beta, state):
    outputs = []
    for t in range(q.shape[2]):
        y, state = lln_step(
            q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], alpha, beta, state
        )
        outputs.append(y)
    return torch.cat(outputs, dim=2), state


def prefix_state(gen, batch, num_kv_heads, alpha, beta, length=23):
    """A genuine state: the naive form run over a random prefix."""
    q, k, v, _, _ = make_inputs(gen, batch, num_kv_heads, num_kv_heads, length)
    return naive_lln_attention(q, k, v, alpha, beta)[1]


def assert_states_close(a: LLNState, b: LLNState, tol: float) -> None:
    assert torch.equal(a.m, b.m) or rel_err(a.m, b.m) < tol
    assert rel_err(a.S, b.S) < tol
    assert rel_err(a.z, b.z) < tol
    assert torch.equal(a.num_tokens, b.num_tokens)


def assert_forms_agree(q, k, v, alpha, beta, state, chunk_size) -> None:
    """Chunked and recurrent = naive (outputs and states, float64), from `state` or empty."""
    y_ref, s_ref = naive_lln_attention(q, k, v, alpha, beta, state=state)
    y_chunk, s_chunk = lln_attention(q, k, v, alpha, beta, state=state, chunk_size=chunk_size)
    start = state or LLNState.empty(q.shape[0], k.shape[1], q.shape[-1], v.shape[-1], q.dtype)
    y_rec, s_rec = run_recurrent(q, k, v, alpha, beta, start)
    assert rel_err(y_chunk, y_ref) < 1e-10
    assert rel_err(y_rec, y_ref) < 1e-10
    assert_states_close(s_chunk, s_ref, 1e-10)
    assert_states_close(s_rec, s_ref, 1e-10)


@pytest.mark.parametrize("seq_len", [1, 7, 64, 100])
@pytest.mark.parametrize("chunk_size", [1, 16, 64])
@pytest.mark.parametrize("heads", [(2, 2), (6, 2), (3, 1)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_recurrent_naive_agree(gen, seq_len, chunk_size, heads, with_state):
    q, k, v, alpha, beta = make_inputs(gen, 2, *heads, seq_len)
    state = prefix_state(gen, 2, heads[1], alpha, beta) if with_state else None
    assert_forms_agree(q, k, v, alpha, beta, state, chunk_size)


@pytest.mark.parametrize("splits", [(1,), (5, 6), (17, 64, 65), (31, 99, 100)])
def test_prefill_split_anywhere(gen, splits):
    q, k, v, alpha, beta = make_inputs(gen, 2, 4, 2, 130)
    y_whole, s_whole = lln_attention(q, k, v, alpha, beta, chunk_size=16)
    outputs, state = [], None
    for start, end in zip((0, *splits), (*splits, 130), strict=True):
        y, state = lln_attention(
            q[:, :, start:end],
            k[:, :, start:end],
            v[:, :, start:end],
            alpha,
            beta,
            state=state,
            chunk_size=16,
        )
        outputs.append(y)
    assert rel_err(torch.cat(outputs, dim=2), y_whole) < 1e-10
    assert_states_close(state, s_whole, 1e-10)


def test_prefill_then_decode_matches_naive(gen):
    q, k, v, alpha, beta = make_inputs(gen, 3, 6, 3, 90)
    y_ref, s_ref = naive_lln_attention(q, k, v, alpha, beta)
    y_pre, state = lln_attention(q[:, :, :70], k[:, :, :70], v[:, :, :70], alpha, beta)
    y_dec, state = run_recurrent(q[:, :, 70:], k[:, :, 70:], v[:, :, 70:], alpha, beta, state)
    assert rel_err(torch.cat([y_pre, y_dec], dim=2), y_ref) < 1e-10
    assert_states_close(state, s_ref, 1e-10)


def test_float32_matches_float64(gen):
    q, k, v, alpha, beta = make_inputs(gen, 2, 6, 2, 300, head_dim=32)
    q, k = q * 2.0, k * 2.0  # |alpha q|, |beta k| up to ~10-20
    y64, _s64 = lln_attention(q, k, v, alpha, beta)
    args32 = [t.float() for t in (q, k, v, alpha, beta)]
    y32, s32 = lln_attention(*args32)
    assert y32.dtype == torch.float32 and s32.S.dtype == torch.float32
    assert rel_err(y32, y64) < 1e-4
    y_rec, _ = run_recurrent(*args32, LLNState.empty(2, 2, 32, 34))
    assert rel_err(y_rec, y64) < 1e-4


def test_half_precision_inputs_keep_float32_state(gen):
    q, k, v, alpha, beta = make_inputs(gen, 1, 2, 2, 40, dtype=torch.float32)
    y, state = lln_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), alpha, beta)
    assert y.dtype == torch.bfloat16 and state.S.dtype == torch.float32
    y_ref, _ = lln_attention(
        q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), alpha, beta
    )
    assert rel_err(y.float(), y_ref) < 1e-2


def test_alpha_per_query_head(gen):
    q, k, v, _, beta = make_inputs(gen, 2, 6, 2, 50)
    alpha = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    y_ref, _ = naive_lln_attention(q, k, v, alpha, beta)
    y, _ = lln_attention(q, k, v, alpha, beta, chunk_size=8)
    assert rel_err(y, y_ref) < 1e-10
    # each query head uses its own alpha: head 0 alone equals a 1-head run with alpha[0]
    y0, _ = naive_lln_attention(q[:, :1], k[:, :1], v[:, :1], alpha[0], beta[0])
    assert rel_err(y[:, :1], y0) < 1e-10


def test_input_does_not_change_and_state_is_not_mutated(gen):
    q, k, v, alpha, beta = make_inputs(gen, 1, 2, 2, 20)
    state = prefix_state(gen, 1, 2, alpha, beta)
    before = state.clone()
    lln_attention(q, k, v, alpha, beta, state=state)
    lln_step(q[:, :, :1], k[:, :, :1], v[:, :, :1], alpha, beta, state)
    assert torch.equal(state.S, before.S) and torch.equal(state.m, before.m)


@pytest.mark.parametrize(
    "shapes",
    [
        ((1, 2, 4, 8), (1, 3, 4, 8), (1, 3, 4, 8)),  # Hq not a multiple of Hkv
        ((1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 5, 8)),  # T differs
        ((1, 2, 4, 8), (1, 2, 4, 6), (1, 2, 4, 8)),  # D differs
        ((2, 4, 8), (2, 4, 8), (2, 4, 8)),  # not 4-d
    ],
)
def test_bad_shapes_raise(shapes):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError):
        lln_attention(q, k, v, 1.0, 1.0)


def test_bad_parameters_raise():
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError):
        lln_attention(q, k, v, torch.ones(3), 1.0)
    with pytest.raises(ValueError):
        lln_attention(q, k, v, 1.0, torch.ones(4))  # beta is per KV head only
    with pytest.raises(ValueError):
        lln_attention(q, k, v, 1.0, 1.0, chunk_size=0)
    with pytest.raises(ValueError):
        lln_step(q, k, v, 1.0, 1.0, LLNState.empty(1, 2, 8))


def test_right_padded_batch_equals_each_row_alone(gen):
    q, k, v, alpha, beta = make_inputs(gen, 3, 4, 2, 40)
    state = prefix_state(gen, 3, 2, alpha, beta)
    lengths = torch.tensor([40, 17, 0])
    y, s = lln_attention(q, k, v, alpha, beta, state=state, chunk_size=16, lengths=lengths)
    assert torch.isfinite(y).all()
    for row, length in enumerate(lengths.tolist()):
        sl = slice(row, row + 1)
        row_state = state.index_select(torch.tensor([row]))
        if length == 0:  # nothing real in this row: its state is untouched
            assert_states_close(s.index_select(torch.tensor([row])), row_state, 1e-15)
            continue
        y_row, s_row = naive_lln_attention(
            q[sl, :, :length], k[sl, :, :length], v[sl, :, :length], alpha, beta, state=row_state
        )
        assert rel_err(y[sl, :, :length], y_row) < 1e-10
        assert_states_close(s.index_select(torch.tensor([row])), s_row, 1e-10)


def test_bad_lengths_raise():
    q, k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    for lengths in (torch.tensor([6, 1]), torch.tensor([1]), torch.tensor([-1, 2])):
        with pytest.raises(ValueError):
            lln_attention(q, k, v, 1.0, 1.0, lengths=lengths)


@pytest.mark.parametrize("heads", [(2, 2), (6, 2)])
@pytest.mark.parametrize("with_state", [False, True])
def test_linear_feature_maps_forms_agree(gen, heads, with_state):
    q, k, v, alpha, beta = make_inputs(gen, 2, *heads, 45)
    w_q, w_k = feature_maps(gen, *heads)
    state = prefix_state(gen, 2, heads[1], alpha, beta) if with_state else None
    assert_forms_agree(q, k, v, w_q, w_k, state, chunk_size=8)


def test_linear_feature_map_is_a_map_of_q_and_k(gen):
    """exp(W_q q) . exp(W_k k): the same as unit scales on q @ W_q^T and k @ W_k^T, and a map
    that is a multiple of the identity is the scalar scale."""
    q, k, v, alpha, beta = make_inputs(gen, 1, 6, 2, 30)
    w_q, w_k = feature_maps(gen, 6, 2)
    y, _ = naive_lln_attention(q, k, v, w_q, w_k)
    q_mapped = torch.einsum("bhtd,hed->bhte", q, w_q)
    k_mapped = torch.einsum("bhtd,hed->bhte", k, w_k)
    y_mapped, _ = naive_lln_attention(q_mapped, k_mapped, v, 1.0, 1.0)
    assert rel_err(y, y_mapped) < 1e-12
    eye = torch.eye(8, dtype=torch.float64)
    y_scale, _ = lln_attention(q, k, v, alpha, beta)
    y_eye, _ = lln_attention(
        q, k, v, alpha.repeat_interleave(3)[:, None, None] * eye, beta[:, None, None] * eye
    )
    assert rel_err(y_eye, y_scale) < 1e-12


def test_feature_map_of_the_wrong_shape_raises(gen):
    q, k, v, _, _ = make_inputs(gen, 1, 6, 2, 5)
    w_q, w_k = feature_maps(gen, 6, 2)
    with pytest.raises(ValueError, match="query-side feature map"):
        lln_attention(q, k, v, w_q[:2], w_k)  # per KV head: a query map is per query head
    with pytest.raises(ValueError, match="key-side feature map"):
        lln_attention(q, k, v, w_q, w_q)
