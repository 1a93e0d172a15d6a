"""Far tier at a fixed rotary distance: exact angles at any position, and chunked prefill split
anywhere + decode steps == the naive form with the far tier's queries and keys, with sinks, a
sparse cache, GQA, padding and bfloat16 storage."""

import pytest
import torch

from lln_core.ops.common import round_to
from lln_core.ops.far import FarRotary, group_at, naive_grouped_logits, rotary_cos_sin, rotate
from lln_core.ops.lln_diag import (
    empty_lln_diag_state,
    lln_diag_attention,
    lln_diag_step,
    naive_lln_diag_attention,
)
from lln_core.ops.softmax import LocalSpec
from tests.conftest import randn, rel_err
from tests.lln_core.test_lln_diag import mix_for, power_for
from tests.lln_core.test_sparse import evict_scores, scores_for

SPEC = LocalSpec("window", 6, num_sinks=2)
DIM = 8
INV_FREQ = 1.0 / (100_000 ** (torch.arange(0, DIM, 2, dtype=torch.float64) / DIM))
DISTANCE, SINK_DISTANCE = 9, 7
GROUP, MAX_DISTANCE = 3, 10  # grouped: the group doubles past position 20 and again past 35


def rope(x, positions):
    """x [B, H, T, D] rotated at positions [T] (float64 angles)."""
    return rotate(x, *rotary_cos_sin(INV_FREQ, positions, dtype=x.dtype))


def far_rotary(positions, dtype=torch.float64, grouped=False):
    return FarRotary.make(INV_FREQ, positions, window=SPEC.size, distance=DISTANCE,
                          sink_distance=SINK_DISTANCE, dtype=dtype, group=GROUP if grouped else 0,
                          max_distance=MAX_DISTANCE)  # fmt: skip


def inputs(gen, batch, heads, seq_len, kv_dtype=None):
    """Queries before RoPE, keys and queries after it (keys rounded to their storage, as the
    model stores them), values and the feature scales."""
    q_raw = randn(gen, batch, heads[0], seq_len, DIM)
    pos = torch.arange(seq_len)
    q, k = rope(q_raw, pos), rope(randn(gen, batch, heads[1], seq_len, DIM), pos)
    v = randn(gen, batch, heads[1], seq_len, DIM)
    if kv_dtype is not None:
        k, v = round_to(k, kv_dtype), round_to(v, kv_dtype)
    alpha = torch.linspace(0.8, 1.5, heads[1], dtype=torch.float64)
    beta = torch.linspace(1.2, 0.6, heads[1], dtype=torch.float64)
    return q_raw, q, k, v, alpha, beta


def naive_far(q_raw, k, kv_dtype, grouped=False):
    """The far tier's queries and every key as the far tier holds it (at position 0); grouped:
    the sparse cache's logits from its distances (`naive_grouped_logits`)."""
    pos = torch.arange(k.shape[2])
    cos, sin = rotary_cos_sin(INV_FREQ, pos, dtype=k.dtype)
    far_keys = rotate(k, cos, -sin)
    if kv_dtype is not None:
        far_keys = round_to(far_keys, kv_dtype)
    far = dict(
        far_query=rope(q_raw, torch.tensor(DISTANCE)),
        sink_query=rope(q_raw, torch.tensor(SINK_DISTANCE)),
        far_keys=far_keys,
    )
    if grouped:
        batch, heads, seq_len, dim = q_raw.shape
        q_grouped = q_raw.view(batch, k.shape[1], heads // k.shape[1], seq_len, dim)
        far["kept_logits"] = naive_grouped_logits(
            q_grouped, far_keys, INV_FREQ, window=SPEC.size, group=GROUP, max_distance=MAX_DISTANCE
        )
    return far


@pytest.mark.parametrize("heads", [(2, 2), (6, 2)], ids=["gqa1", "gqa3"])
@pytest.mark.parametrize(
    ("size", "grouped"),
    [(0, False), (4, False), (4, True)],  # grouped positions are the sparse cache's
    ids=["no-cache", "cache4", "cache4-grouped"],
)
@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16], ids=["kv-state", "kv-bf16"])
def test_forms_agree(gen, heads, size, kv_dtype, grouped):
    """Prefill split anywhere, then decode steps: outputs and final states equal the naive
    form with every far key at the fixed distance (grouped: the sparse cache's pairs at their
    grouped distances, the group doubling as the context grows); chunked prefill of the whole
    sequence leaves the same state as the steps."""
    batch, seq_len = 2, 45
    q_raw, q, k, v, alpha, beta = inputs(gen, batch, heads, seq_len, kv_dtype)
    mix, power = mix_for("joint", heads[0]), power_for("joint", heads[0])
    scores = scores_for(gen, batch, seq_len)
    kwargs = dict(local=SPEC, combine="joint", count_power=power)
    y_ref = naive_lln_diag_attention(
        q, k, v, alpha, beta, mix, sparse_size=size, scores=scores,
        **naive_far(q_raw, k, kv_dtype, grouped), **kwargs,
    )  # fmt: skip

    def empty():
        return empty_lln_diag_state(
            batch, heads[1], DIM, SPEC, dtype=torch.float64, sparse_size=size, kv_dtype=kv_dtype
        )

    def run(state, start, end):
        positions = torch.arange(start, end).expand(batch, -1)
        far = far_rotary(positions, grouped=grouped).tier(q_raw[:, :, start:end])
        sl = slice(start, end)
        score = evict_scores(scores, start, end, SPEC.size) if size else None
        if end - start == 1:
            return lln_diag_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], alpha, beta, mix, state,
                                 evict_score=score, far=far, **kwargs)  # fmt: skip
        return lln_diag_attention(
            q[:, :, sl], k[:, :, sl], v[:, :, sl], alpha, beta, mix, state=state, chunk_size=4,
            evict_score=score, far=far, **kwargs,
        )  # fmt: skip

    state, outputs = empty(), []
    bounds = [(0, 3), (3, 17), (17, 30)] + [(t, t + 1) for t in range(30, seq_len)]
    for start, end in bounds:
        y, state = run(state, start, end)
        outputs.append(y)
    assert rel_err(torch.cat(outputs, dim=2), y_ref) < 1e-10

    _, whole = run(empty(), 0, seq_len)
    for a, b in ((whole.S, state.S), (whole.z, state.z)):
        assert rel_err(a, b) < 1e-10
    assert torch.equal(whole.m, state.m)
    if size:  # the same pairs (slots are filled in arrival order, so they may differ)
        (pos_a, k_a), (pos_b, k_b) = cached_pairs(whole.sparse), cached_pairs(state.sparse)
        assert torch.equal(pos_a, pos_b) and torch.equal(k_a, k_b)


def cached_pairs(sparse):
    """The cache's positions and keys in position order."""
    order = sparse.pos.argsort(dim=1)
    keys = torch.stack([sparse.k[row][:, order[row]] for row in range(order.shape[0])])
    return sparse.pos.gather(1, order), keys


def test_far_tier_changes_only_far_keys(gen):
    """Up to the window's length nothing is far: the fixed tier gives the original output;
    past it, it differs (the far keys are read at another distance)."""
    heads, seq_len = (4, 2), 30
    q_raw, q, k, v, alpha, beta = inputs(gen, 1, heads, seq_len)
    mix, power = mix_for("joint", 4), power_for("joint", 4)
    kwargs = dict(local=SPEC, combine="joint", count_power=power, sparse_size=3)
    original = naive_lln_diag_attention(q, k, v, alpha, beta, mix, **kwargs)
    fixed = naive_lln_diag_attention(q, k, v, alpha, beta, mix, **naive_far(q_raw, k, None),
                                     **kwargs)  # fmt: skip
    near = SPEC.size
    assert torch.equal(original[:, :, :near], fixed[:, :, :near])
    assert rel_err(fixed[:, :, near:], original[:, :, near:]) > 1e-3


def test_far_logits_do_not_depend_on_position(gen):
    """A far key's logit is the same whatever the positions of query and key: the query at
    `distance` against the key re-rotated to 0 (float32, positions up to 10^7)."""
    q_raw, k_raw = (
        randn(gen, 1, 1, 1, DIM, dtype=torch.float32),
        randn(gen, 1, 1, 1, DIM, dtype=torch.float32),
    )
    logits = []
    for key_pos in (0, 12_345, 10**6, 10**7):
        query_pos = key_pos + SPEC.size  # the key leaves the window at this query
        k = rope(k_raw, torch.tensor(key_pos))
        far = far_rotary(torch.tensor([[query_pos]]), dtype=torch.float32).tier(q_raw)
        logits.append(float((far.query * far.enter(k)).sum()))
    expected = float((rope(q_raw, torch.tensor(DISTANCE)) * k_raw).sum())
    assert logits == pytest.approx([expected] * 4, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("position", [10**6, 10**7])
def test_rotary_angles_exact_at_any_position(gen, position):
    """Window logits at position 10^6 and 10^7 equal those at 0 to float32 rounding; angles
    formed in float32 (transformers' way) are off by far more there."""
    q_raw = randn(gen, 1, 4, 1, 64, dtype=torch.float32)
    k_raw = randn(gen, 1, 4, 16, 64, dtype=torch.float32)
    inv_freq = 1.0 / (100_000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    distances = torch.arange(16)

    def logits(start, angles_dtype):
        query_pos = torch.tensor([start + 15])
        key_pos = start + 15 - distances

        def table(pos):
            if angles_dtype == torch.float64:
                return rotary_cos_sin(inv_freq, pos)
            angles = pos.float()[:, None] * inv_freq  # float32 angles
            angles = torch.cat([angles, angles], dim=-1)
            return angles.cos(), angles.sin()

        q = rotate(q_raw, *table(query_pos))
        k = rotate(k_raw, *table(key_pos))
        return (q * k).sum(-1)

    at_zero = logits(0, torch.float64)
    scale = at_zero.abs().max()
    exact_error = (logits(position, torch.float64) - at_zero).abs().max() / scale
    float32_error = (logits(position, torch.float32) - at_zero).abs().max() / scale
    assert exact_error < 1e-5
    assert float32_error > 100 * exact_error


def test_padded_batch_rows_at_different_positions(gen):
    """A right-padded chunk over rows at different positions, then one step per row, with the
    far tier: each row's last output equals its own naive form."""
    size, heads, total = 3, (6, 2), 40
    q_raw, q, k, v, alpha, beta = inputs(gen, 3, heads, total)
    mix, power = mix_for("joint", 6), power_for("joint", 6)
    scores = scores_for(gen, 3, total)
    kwargs = dict(local=SPEC, combine="joint", count_power=power)
    state = empty_lln_diag_state(3, 2, DIM, SPEC, dtype=torch.float64, sparse_size=size)
    first = slice(0, 9)
    far = far_rotary(torch.arange(0, 9).expand(3, -1)).tier(q_raw[:, :, first])
    _, state = lln_diag_attention(
        q[:, :, first], k[:, :, first], v[:, :, first], alpha, beta, mix, state=state,
        evict_score=evict_scores(scores, 0, 9, SPEC.size), far=far, **kwargs,
    )  # fmt: skip
    lengths, chunk = torch.tensor([25, 3, 0]), slice(9, 34)
    far = far_rotary(torch.arange(9, 34).expand(3, -1)).tier(q_raw[:, :, chunk])
    _, state = lln_diag_attention(
        q[:, :, chunk], k[:, :, chunk], v[:, :, chunk], alpha, beta, mix, state=state,
        chunk_size=4, lengths=lengths, evict_score=evict_scores(scores, 9, 34, SPEC.size),
        far=far, **kwargs,
    )  # fmt: skip
    at = (9 + lengths).tolist()

    def nxt(x):
        return torch.stack([x[r, :, t] for r, t in enumerate(at)])[:, :, None]

    all_scores = evict_scores(scores, 0, total, SPEC.size)
    score = torch.stack([all_scores[r, t] for r, t in enumerate(at)])[:, None]
    far = far_rotary(torch.tensor(at)[:, None]).tier(nxt(q_raw))
    y, _ = lln_diag_step(nxt(q), nxt(k), nxt(v), alpha, beta, mix, state, evict_score=score,
                         far=far, **kwargs)  # fmt: skip
    for row, end in enumerate(t + 1 for t in at):
        rows = slice(row, row + 1)
        y_ref = naive_lln_diag_attention(
            q[rows, :, :end], k[rows, :, :end], v[rows, :, :end], alpha, beta, mix,
            sparse_size=size, scores=scores[rows, :end],
            **naive_far(q_raw[rows, :, :end], k[rows, :, :end], None), **kwargs,
        )  # fmt: skip
        assert rel_err(y[row, :, 0], y_ref[0, :, -1]) < 1e-10


def test_group_doubles_only_to_keep_every_pair_within_reach():
    """The group is the first doubling that reads a pair at position 0 within the reach, at any
    position up to 10^12; the default model's g = 8 holds to position 29,639 (448-token window,
    reach 4096): revision 10's positions, unchanged below that."""
    window, reach = 448, 4096
    positions = torch.tensor([[0, 1, 448, 29_639, 29_640, 60_000, 10**6, 10**9, 10**12]])
    groups = group_at(positions, 8, window, reach)

    def farthest(g):
        return positions // g + window - window // g

    assert (farthest(groups) <= reach).all()
    halved = groups // 2
    assert ((halved < 8) | (farthest(halved) > reach)).all()
    assert groups[0, :4].eq(8).all() and groups[0, 4] == 16


@pytest.mark.parametrize("size", [0, 4], ids=["no-cache", "cache4"])
def test_prefill_inside_the_window_is_the_window_alone(gen, size):
    """Inference prefill whose queries all sit inside the window takes the window-only path:
    the same output and state as the full path (taken where gradients flow), in two pieces."""
    batch, heads = 2, (6, 2)
    q_raw, q, k, v, alpha, beta = inputs(gen, batch, heads, SPEC.size)
    mix, power = mix_for("joint", heads[0]), power_for("joint", heads[0])

    def prefill():
        state = empty_lln_diag_state(batch, heads[1], DIM, SPEC, dtype=torch.float64,
                                     sparse_size=size)  # fmt: skip
        outputs = []
        for start, end in ((0, 2), (2, SPEC.size)):
            positions = torch.arange(start, end).expand(batch, -1)
            far = far_rotary(positions).tier(q_raw[:, :, start:end])
            y, state = lln_diag_attention(
                q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], alpha, beta, mix,
                local=SPEC, combine="joint", count_power=power, state=state, far=far,
            )  # fmt: skip
            outputs.append(y)
        return torch.cat(outputs, dim=2), state

    with torch.no_grad():
        y_fast, fast = prefill()
    y_full, full = prefill()
    assert torch.equal(y_fast, y_full)
    for a, b in zip(fast.flat(), full.flat(), strict=True):
        assert torch.equal(a, b)
