"""LLN + local softmax branch: chunked == recurrent == naive; bounded state; mixed lengths."""

import pytest
import torch

import lln_core.ops.softmax as softmax_module
from lln_core.ops.lln_diag import (
    empty_lln_diag_state,
    lln_diag_attention,
    lln_diag_step,
    naive_lln_diag_attention,
)
from lln_core.ops.softmax import LocalSpec
from tests.conftest import feature_maps, randn, rel_err

VARIANTS = [
    (LocalSpec("window", 7, num_sinks=2), "joint"),
    (LocalSpec("window", 16, num_sinks=0), "joint"),
    (LocalSpec("window", 5, num_sinks=4), "average"),
    (LocalSpec("block", 8), "average"),
    (LocalSpec("block", 6, num_sinks=1), "average"),
]


@pytest.fixture(params=["window", 3], ids=["query-block=window", "query-block=3"])
def query_block(request, monkeypatch):
    """The local branch's prefill scores queries in blocks of min(W, QUERY_BLOCK): as wide as
    the test windows (the default here) or narrower than all of them."""
    if request.param != "window":
        monkeypatch.setattr(softmax_module, "QUERY_BLOCK", request.param)


def make_inputs(gen, batch, num_q_heads, num_kv_heads, seq_len, head_dim=8, dtype=torch.float64):
    q = randn(gen, batch, num_q_heads, seq_len, head_dim, dtype=dtype)
    k = randn(gen, batch, num_kv_heads, seq_len, head_dim, dtype=dtype)
    v = randn(gen, batch, num_kv_heads, seq_len, head_dim, dtype=dtype)
    alpha = torch.linspace(0.8, 1.5, num_kv_heads, dtype=dtype)
    beta = torch.linspace(1.2, 0.6, num_kv_heads, dtype=dtype)
    return q, k, v, alpha, beta


def mix_for(combine, num_q_heads, dtype=torch.float64):
    if combine == "average":
        return torch.linspace(0.2, 0.8, num_q_heads, dtype=dtype)  # weight of the LLN output
    return torch.linspace(-2.0, 1.0, num_q_heads, dtype=dtype)  # log-weight of the LLN part


def power_for(combine, num_q_heads, dtype=torch.float64):
    """count_power, the length-aware part of the joint log-weight (joint only)."""
    if combine == "average":
        return 0.0
    return torch.linspace(0.0, 0.9, num_q_heads, dtype=dtype)


def run_steps(q, k, v, alpha, beta, mix, spec, combine, state, count_power=0.0):
    outputs = []
    for t in range(q.shape[2]):
        y, state = lln_diag_step(
            q[:, :, t : t + 1],
            k[:, :, t : t + 1],
            v[:, :, t : t + 1],
            alpha,
            beta,
            mix,
            state,
            local=spec,
            combine=combine,
            count_power=count_power,
        )
        outputs.append(y)
    return torch.cat(outputs, dim=2), state


@pytest.mark.parametrize(("spec", "combine"), VARIANTS)
@pytest.mark.parametrize("heads", [(2, 2), (6, 2)])
@pytest.mark.parametrize("chunk_size", [4, 16])
def test_forms_agree(gen, spec, combine, heads, chunk_size, query_block):
    q, k, v, alpha, beta = make_inputs(gen, 2, *heads, 45)
    mix, power = mix_for(combine, heads[0]), power_for(combine, heads[0])
    kwargs = dict(local=spec, combine=combine, count_power=power)
    y_ref = naive_lln_diag_attention(q, k, v, alpha, beta, mix, **kwargs)
    y_chunk, s_chunk = lln_diag_attention(
        q, k, v, alpha, beta, mix, chunk_size=chunk_size, **kwargs
    )
    empty = empty_lln_diag_state(2, heads[1], 8, spec, dtype=torch.float64)
    y_rec, s_rec = run_steps(q, k, v, alpha, beta, mix, spec, combine, empty, power)
    assert rel_err(y_chunk, y_ref) < 1e-10
    assert rel_err(y_rec, y_ref) < 1e-10
    for a, b in ((s_chunk.S, s_rec.S), (s_chunk.z, s_rec.z), (s_chunk.local.k, s_rec.local.k)):
        assert rel_err(a, b) < 1e-10
    assert torch.equal(s_chunk.local.pos, s_rec.local.pos)
    assert torch.equal(s_chunk.num_tokens, s_rec.num_tokens)


@pytest.mark.parametrize(("spec", "combine"), VARIANTS)
def test_prefill_split_then_decode(gen, spec, combine, query_block):
    q, k, v, alpha, beta = make_inputs(gen, 2, 4, 2, 60)
    mix, power = mix_for(combine, 4), power_for(combine, 4)
    kwargs = dict(local=spec, combine=combine, count_power=power)
    y_ref = naive_lln_diag_attention(q, k, v, alpha, beta, mix, **kwargs)
    outputs, state = [], None
    for start, end in ((0, 3), (3, 20), (20, 41)):
        y, state = lln_diag_attention(
            q[:, :, start:end],
            k[:, :, start:end],
            v[:, :, start:end],
            alpha,
            beta,
            mix,
            state=state,
            chunk_size=8,
            **kwargs,
        )
        outputs.append(y)
    y, state = run_steps(
        q[:, :, 41:], k[:, :, 41:], v[:, :, 41:], alpha, beta, mix, spec, combine, state, power
    )
    outputs.append(y)
    assert rel_err(torch.cat(outputs, dim=2), y_ref) < 1e-10


def test_sequences_at_different_lengths_in_one_batch(gen):
    """Slot states of sequences at different positions, gathered into one batch, step together."""
    spec, combine = LocalSpec("window", 6, num_sinks=2), "joint"
    q, k, v, alpha, beta = make_inputs(gen, 2, 4, 2, 40)
    mix, power = mix_for(combine, 4), power_for(combine, 4)
    lengths = (9, 23)  # sequence 0 has 9 tokens of prefill, sequence 1 has 23
    batch_state = empty_lln_diag_state(2, 2, 8, spec, dtype=torch.float64)
    for row, length in enumerate(lengths):
        sl = slice(row, row + 1)
        _, s = lln_diag_attention(
            q[sl, :, :length],
            k[sl, :, :length],
            v[sl, :, :length],
            alpha,
            beta,
            mix,
            local=spec,
            combine=combine,
            count_power=power,
        )
        batch_state.index_copy_(torch.tensor([row]), s)
    # next token of each sequence: position 9 for row 0, 23 for row 1
    pick = lambda x: torch.stack([x[0, :, lengths[0]], x[1, :, lengths[1]]])[:, :, None]  # noqa: E731
    y, _ = lln_diag_step(
        pick(q), pick(k), pick(v), alpha, beta, mix, batch_state, local=spec, combine=combine,
        count_power=power,
    )  # fmt: skip
    for row, length in enumerate(lengths):
        sl = slice(row, row + 1)
        y_ref = naive_lln_diag_attention(
            q[sl, :, : length + 1],
            k[sl, :, : length + 1],
            v[sl, :, : length + 1],
            alpha,
            beta,
            mix,
            local=spec,
            combine=combine,
            count_power=power,
        )
        assert rel_err(y[row, :, 0], y_ref[0, :, -1]) < 1e-10


def test_state_is_bounded(gen):
    spec = LocalSpec("window", 8, num_sinks=4)
    q, k, v, alpha, beta = make_inputs(gen, 1, 2, 2, 1000, dtype=torch.float32)
    _, short = lln_diag_attention(
        q[:, :, :10], k[:, :, :10], v[:, :, :10], alpha, beta, 0.0, local=spec
    )
    _, long = lln_diag_attention(q, k, v, alpha, beta, 0.0, local=spec)
    assert short.nbytes == long.nbytes
    assert sorted(long.local.pos[0].tolist()) == [0, 1, 2, 3, *range(992, 1000)]  # sinks + window


def test_float32_matches_float64(gen):
    spec = LocalSpec("window", 32, num_sinks=4)
    q, k, v, alpha, beta = make_inputs(gen, 2, 6, 2, 200, head_dim=32)
    mix = mix_for("joint", 6)
    y64, _ = lln_diag_attention(q, k, v, alpha, beta, mix, local=spec)
    y32, _ = lln_diag_attention(*(t.float() for t in (q, k, v, alpha, beta, mix)), local=spec)
    assert rel_err(y32, y64) < 1e-4


def test_joint_needs_a_window():
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="window"):
        lln_diag_attention(q, k, v, 1.0, 1.0, 0.0, local=LocalSpec("block", 4), combine="joint")
    with pytest.raises(ValueError):
        LocalSpec("diagonal", 4)
    with pytest.raises(ValueError):
        lln_diag_attention(q, k, v, 1.0, 1.0, 0.0, local=LocalSpec(), combine="sum")


@pytest.mark.parametrize(("spec", "combine"), VARIANTS)
def test_right_padded_batch_equals_each_row_alone(gen, spec, combine, query_block):
    q, k, v, alpha, beta = make_inputs(gen, 3, 4, 2, 51)
    mix = mix_for(combine, 4)
    kwargs = dict(local=spec, combine=combine)
    # every row first prefills 11 tokens, then a padded chunk of 3 different lengths
    _, state = lln_diag_attention(
        q[:, :, :11], k[:, :, :11], v[:, :, :11], alpha, beta, mix, **kwargs
    )
    lengths = torch.tensor([39, 2, 0])
    chunk = slice(11, 50)
    _, s = lln_diag_attention(
        q[:, :, chunk],
        k[:, :, chunk],
        v[:, :, chunk],
        alpha,
        beta,
        mix,
        state=state,
        chunk_size=8,
        lengths=lengths,
        **kwargs,
    )

    # then one decode token per row at its own position
    def nxt(x):
        return torch.stack([x[r, :, 11 + n] for r, n in enumerate(lengths.tolist())])[:, :, None]

    y, _ = lln_diag_step(nxt(q), nxt(k), nxt(v), alpha, beta, mix, s, **kwargs)
    for row, length in enumerate(lengths.tolist()):
        sl, end = slice(row, row + 1), 11 + length + 1
        y_ref = naive_lln_diag_attention(
            q[sl, :, :end], k[sl, :, :end], v[sl, :, :end], alpha, beta, mix, **kwargs
        )
        assert rel_err(y[row, :, 0], y_ref[0, :, -1]) < 1e-10
    assert s.num_tokens.tolist() == [50, 13, 11]


def test_long_inputs_go_through_in_segments(gen, monkeypatch, query_block):
    """Splitting into segments (with padding that ends mid-way) changes nothing."""
    import lln_core.ops.lln_diag as lln_diag_module

    spec, combine = LocalSpec("window", 6, num_sinks=2), "joint"
    q, k, v, alpha, beta = make_inputs(gen, 2, 4, 2, 70)
    mix = mix_for(combine, 4)
    lengths = torch.tensor([70, 23])
    kwargs = dict(local=spec, combine=combine, chunk_size=8, lengths=lengths)
    y_whole, s_whole = lln_diag_attention(q, k, v, alpha, beta, mix, **kwargs)
    monkeypatch.setattr(lln_diag_module, "SEGMENT_TOKENS", 16)
    y_seg, s_seg = lln_diag_attention(q, k, v, alpha, beta, mix, **kwargs)
    assert rel_err(y_seg[0], y_whole[0]) < 1e-12
    assert rel_err(y_seg[1, :, :23], y_whole[1, :, :23]) < 1e-12
    assert rel_err(s_seg.S, s_whole.S) < 1e-12
    assert torch.equal(s_seg.num_tokens, s_whole.num_tokens)


def test_count_power_lowers_the_lln_weight_as_old_keys_accumulate(gen):
    """Joint form: the LLN part's log-weight is mix - count_power * log(n_old); a power of 1
    on a long sequence must equal the same mix shifted by -log(n_old) query by query."""
    spec = LocalSpec("window", 4, num_sinks=1)
    q, k, v, alpha, beta = make_inputs(gen, 1, 2, 2, 30)
    with_power = naive_lln_diag_attention(q, k, v, alpha, beta, 0.5, local=spec, count_power=1.0)
    for t in (4, 5, 12, 29):  # n_old = t - 4 - 1 + 1 old keys (at least one)
        shifted = naive_lln_diag_attention(
            q[:, :, : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], alpha, beta,
            0.5 - torch.log(torch.tensor(max(t - 4, 1.0), dtype=torch.float64)), local=spec,
        )  # fmt: skip
        assert rel_err(with_power[:, :, t], shifted[:, :, t]) < 1e-12
    plain = naive_lln_diag_attention(q, k, v, alpha, beta, 0.5, local=spec)
    assert rel_err(with_power[:, :, 6:], plain[:, :, 6:]) > 1e-3


@pytest.mark.parametrize(("spec", "combine"), VARIANTS[:3])
def test_linear_feature_maps_forms_agree(gen, spec, combine):
    """The key map applies to keys read back from the window when they leave it (joint)."""
    q, k, v, _, _ = make_inputs(gen, 2, 6, 2, 45)
    w_q, w_k = feature_maps(gen, 6, 2)
    mix, power = mix_for(combine, 6), power_for(combine, 6)
    kwargs = dict(local=spec, combine=combine, count_power=power)
    y_ref = naive_lln_diag_attention(q, k, v, w_q, w_k, mix, **kwargs)
    y_chunk, s_chunk = lln_diag_attention(q, k, v, w_q, w_k, mix, chunk_size=8, **kwargs)
    empty = empty_lln_diag_state(2, 2, 8, spec, dtype=torch.float64)
    y_rec, s_rec = run_steps(q, k, v, w_q, w_k, mix, spec, combine, empty, power)
    assert rel_err(y_chunk, y_ref) < 1e-10
    assert rel_err(y_rec, y_ref) < 1e-10
    assert rel_err(s_chunk.S, s_rec.S) < 1e-10 and rel_err(s_chunk.z, s_rec.z) < 1e-10
    # a map changes the LLN part only: the same model with scalar scales differs
    y_scale = naive_lln_diag_attention(q, k, v, 1.0, 1.0, mix, **kwargs)
    assert rel_err(y_scale, y_ref) > 1e-3
