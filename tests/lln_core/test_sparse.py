"""The sparse tier of LLN+Diag: chunked == recurrent == naive (selection recomputed from scratch),
bounded state, and the selection keeps what the LLN state cannot represent."""

import pytest
import torch

from lln_core.ops.common import fused_softmax_fits, round_to
from lln_core.ops.lln_diag import (
    empty_lln_diag_state,
    lln_diag_attention,
    lln_diag_step,
    naive_lln_diag_attention,
)
from lln_core.ops.softmax import LocalSpec
from lln_core.ops.sparse import naive_sparse_mask, sparse_parts, sparse_plan, step_sparse_plan
from lln_core.state import SparseKV
from tests.conftest import rel_err
from tests.lln_core.test_lln_diag import make_inputs, mix_for, power_for

SPEC = LocalSpec("window", 6, num_sinks=2)


def scores_for(gen, batch, seq_len, *, ties: bool = False):
    """Per-position retention scores; with ties, few distinct values (ties go to the newer)."""
    if ties:
        return torch.randint(0, 3, (batch, seq_len), generator=gen).double()
    return torch.rand(batch, seq_len, generator=gen, dtype=torch.float64) * 10


def evict_scores(scores, start, end, window):
    """What a caller gives the kernel: the score of the key leaving the window at each query."""
    pos = torch.arange(start, end) - window
    return torch.where(pos >= 0, scores[:, pos.clamp_min(0)], 0.0)


def steps(q, k, v, alpha, beta, mix, state, scores, start, **kwargs):
    outputs = []
    for t in range(q.shape[2]):
        piece = slice(t, t + 1)
        score = evict_scores(scores, start + t, start + t + 1, kwargs["local"].size)
        y, state = lln_diag_step(
            q[:, :, piece], k[:, :, piece], v[:, :, piece], alpha, beta, mix, state,
            evict_score=score, **kwargs,
        )  # fmt: skip
        outputs.append(y)
    return torch.cat(outputs, dim=2), state


@pytest.mark.parametrize("heads", [(2, 2), (6, 2)], ids=["gqa1", "gqa3"])
@pytest.mark.parametrize("size", [1, 5, 64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("kv_dtype", [None, torch.bfloat16], ids=["kv-state", "kv-bf16"])
def test_forms_agree(gen, heads, size, ties, kv_dtype):
    """Prefill split anywhere (pieces not multiples of anything), then decode steps: outputs
    and states equal the naive form, which picks each query's cache from scratch. Exact pairs
    stored in bfloat16 change nothing for keys and values already rounded to it."""
    seq_len = 57
    q, k, v, alpha, beta = make_inputs(gen, 2, *heads, seq_len)
    if kv_dtype is not None:
        k, v = round_to(k, kv_dtype), round_to(v, kv_dtype)
    mix, power = mix_for("joint", heads[0]), power_for("joint", heads[0])
    scores = scores_for(gen, 2, seq_len, ties=ties)
    kwargs = dict(local=SPEC, combine="joint", count_power=power)
    y_ref = naive_lln_diag_attention(
        q, k, v, alpha, beta, mix, sparse_size=size, scores=scores, **kwargs
    )
    state = empty_lln_diag_state(
        2, heads[1], 8, SPEC, dtype=torch.float64, sparse_size=size, kv_dtype=kv_dtype
    )
    outputs = []
    for start, end in ((0, 3), (3, 20), (20, 41)):
        y, state = lln_diag_attention(
            q[:, :, start:end], k[:, :, start:end], v[:, :, start:end], alpha, beta, mix,
            state=state, chunk_size=4, evict_score=evict_scores(scores, start, end, SPEC.size),
            **kwargs,
        )  # fmt: skip
        outputs.append(y)
    y, s_steps = steps(q[:, :, 41:], k[:, :, 41:], v[:, :, 41:], alpha, beta, mix, state,
                       scores, 41, **kwargs)  # fmt: skip
    outputs.append(y)
    assert rel_err(torch.cat(outputs, dim=2), y_ref) < 1e-10

    _, s_chunk = lln_diag_attention(
        q, k, v, alpha, beta, mix, state=empty_lln_diag_state(
            2, heads[1], 8, SPEC, dtype=torch.float64, sparse_size=size, kv_dtype=kv_dtype),
        chunk_size=8, evict_score=evict_scores(scores, 0, seq_len, SPEC.size), **kwargs,
    )  # fmt: skip
    for a, b in ((s_chunk.S, s_steps.S), (s_chunk.z, s_steps.z)):
        assert rel_err(a, b) < 1e-10
    assert torch.equal(s_chunk.m, s_steps.m)
    for s in (s_chunk, s_steps):  # the cache holds the G best keys that left the window
        old = torch.zeros(seq_len + 1, seq_len, dtype=torch.bool)
        old[seq_len, SPEC.num_sinks : seq_len - SPEC.size] = True  # left by the last query
        best = naive_sparse_mask(old, scores, size)[:, -1]
        for row in range(2):
            kept = sorted(p for p in s.sparse.pos[row].tolist() if p >= 0)
            assert kept == best[row].nonzero().flatten().tolist()
            order = s.sparse.pos[row].clamp_min(0)
            expected_k = k[row, :, order]
            used = s.sparse.pos[row] >= 0
            assert torch.equal(s.sparse.k[row][:, used].to(k.dtype), expected_k[:, used])
            assert s.sparse.k.dtype == (kv_dtype or torch.float64)


def test_padded_batch_rows_at_different_positions(gen):
    """A right-padded chunk over rows at different positions, then one step per row."""
    size = 4
    q, k, v, alpha, beta = make_inputs(gen, 3, 6, 2, 60)
    mix, power = mix_for("joint", 6), power_for("joint", 6)
    scores = scores_for(gen, 3, 60)
    kwargs = dict(local=SPEC, combine="joint", count_power=power)
    state = empty_lln_diag_state(3, 2, 8, SPEC, dtype=torch.float64, sparse_size=size)
    _, state = lln_diag_attention(
        q[:, :, :13], k[:, :, :13], v[:, :, :13], alpha, beta, mix, state=state,
        evict_score=evict_scores(scores, 0, 13, SPEC.size), **kwargs,
    )  # fmt: skip
    lengths = torch.tensor([40, 3, 0])
    chunk = slice(13, 53)
    _, state = lln_diag_attention(
        q[:, :, chunk], k[:, :, chunk], v[:, :, chunk], alpha, beta, mix, state=state,
        chunk_size=8, lengths=lengths, evict_score=evict_scores(scores, 13, 53, SPEC.size),
        **kwargs,
    )  # fmt: skip

    def nxt(x):
        return torch.stack([x[r, :, 13 + n] for r, n in enumerate(lengths.tolist())])

    all_scores = evict_scores(scores, 0, 60, SPEC.size)
    score = torch.stack([all_scores[r, 13 + n] for r, n in enumerate(lengths.tolist())])[:, None]
    y, _ = lln_diag_step(nxt(q)[:, :, None], nxt(k)[:, :, None], nxt(v)[:, :, None], alpha,
                         beta, mix, state, evict_score=score, **kwargs)  # fmt: skip
    for row, length in enumerate(lengths.tolist()):
        end = 13 + length + 1
        y_ref = naive_lln_diag_attention(
            q[row : row + 1, :, :end], k[row : row + 1, :, :end], v[row : row + 1, :, :end],
            alpha, beta, mix, sparse_size=size, scores=scores[row : row + 1, :end], **kwargs,
        )  # fmt: skip
        assert rel_err(y[row, :, 0], y_ref[0, :, -1]) < 1e-10


def test_cache_keeps_a_pair_the_state_cannot_represent(gen):
    """A planted key far from the rest, with a value of its own, is recalled from the cache
    long after it left the window; without the cache the LLN state blurs it away."""
    seq_len, size = 300, 8
    q, k, v, _, _ = make_inputs(gen, 1, 2, 2, seq_len)
    k, v = k * 0.3, v.clone()
    planted, probe = 20, seq_len - 1
    direction = torch.zeros(8, dtype=torch.float64)
    direction[0] = 1.0
    k[:, :, planted] = 6.0 * direction
    v[:, :, planted] = torch.full((8,), 5.0, dtype=torch.float64)
    q[:, :, probe] = 6.0 * direction
    scores = torch.zeros(1, seq_len, dtype=torch.float64)
    scores[0, planted] = 10.0  # the caller's score marks the pair
    kwargs = dict(local=SPEC, combine="joint", scale=1.0)
    with_cache = naive_lln_diag_attention(q, k, v, 1.0, 1.0, 0.0, sparse_size=size,
                                          scores=scores, **kwargs)  # fmt: skip
    without = naive_lln_diag_attention(q, k, v, 1.0, 1.0, 0.0, **kwargs)
    assert with_cache[0, 0, probe].mean() > 4.5  # the planted value, almost alone
    assert without[0, 0, probe].mean() < 3.5  # blurred with the rest
    state = empty_lln_diag_state(1, 2, 8, SPEC, dtype=torch.float64, sparse_size=size)
    _, state = lln_diag_attention(q, k, v, 1.0, 1.0, 0.0, state=state,
                                  evict_score=evict_scores(scores, 0, seq_len, SPEC.size),
                                  **kwargs)  # fmt: skip
    assert planted in state.sparse.pos[0].tolist()


def test_plan_drops_the_lowest_and_merges_it():
    """G = 2 holding scores 5 and 1: a key scored 3 replaces the 1 (merged), one scored 0 is
    merged at once; the kept pair stays in its slot."""
    cache = SparseKV.empty(1, 1, 2, 2, dtype=torch.float64)
    cache.pos[:] = torch.tensor([[7, 9]])
    cache.score[:] = torch.tensor([[5.0, 1.0]], dtype=torch.float64)
    plan = sparse_plan(cache, torch.tensor([[10, 11]]), torch.tensor([[3.0, 0.0]]),
                       torch.tensor([[True, True]]))  # fmt: skip
    assert plan.merged_valid.tolist() == [[True, True]]
    assert plan.merged.tolist() == [[1, 3]]  # the 1-scored cached pair, then the new 0
    assert plan.pos.tolist() == [[7, 10]]
    assert plan.columns.tolist() == [[0, 2]]  # only the pairs some query sees
    assert plan.visible[0].tolist() == [[True, True], [True, True]]


@pytest.mark.parametrize("trial", range(40))
def test_step_plan_equals_the_general_plan(trial):
    """The O(G) decode plan makes the general plan's decisions: caches full, part full or
    empty, scores with ties (integers), leaving keys absent, batch rows in different states."""
    gen = torch.Generator().manual_seed(trial)
    batch, size = 4, 1 + trial % 6
    cache = SparseKV.empty(batch, 1, 2, size, dtype=torch.float64)
    for row in range(batch):
        used = int(torch.randint(0, size + 1, (1,), generator=gen))
        slots = torch.randperm(size, generator=gen)[:used]
        cache.pos[row, slots] = torch.randperm(50, generator=gen)[:used]
        cache.score[row, slots] = torch.randint(0, 3, (used,), generator=gen).double()
    evict_pos = torch.randint(50, 60, (batch, 1), generator=gen)
    evict_score = torch.randint(0, 3, (batch, 1), generator=gen).double()
    evict_valid = torch.rand(batch, 1, generator=gen) < 0.8
    fast = step_sparse_plan(cache, evict_pos, evict_score, evict_valid)
    slow = sparse_plan(cache, evict_pos, evict_score, evict_valid, compact=False)
    names = ("columns", "visible", "merged", "merged_valid", "keep", "pos", "score", "candidates")
    for name, a, b in zip(names, fast.flat(), slow.flat(), strict=True):
        if name == "merged":  # meaningless where nothing is merged
            a, b = a[slow.merged_valid], b[slow.merged_valid]
        assert torch.equal(a, b), name


def test_state_bytes_do_not_grow(gen):
    size = 16
    q, k, v, alpha, beta = make_inputs(gen, 1, 2, 2, 2000, dtype=torch.float32)
    scores = torch.rand(1, 2000, generator=gen)
    states = []
    for seq_len in (10, 2000):
        state = empty_lln_diag_state(1, 2, 8, SPEC, sparse_size=size)
        _, state = lln_diag_attention(
            q[:, :, :seq_len], k[:, :, :seq_len], v[:, :, :seq_len], alpha, beta, 0.0,
            local=SPEC, state=state, evict_score=evict_scores(scores, 0, seq_len, SPEC.size),
        )  # fmt: skip
        states.append(state)
    assert states[0].nbytes == states[1].nbytes
    assert int((states[1].sparse.pos >= 0).sum()) == size


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_parts_equal_the_unfused_ones(gen, dtype):
    """The fused CPU kernel (no autograd) and the elementwise path (taken when autograd needs
    the inputs) give the same parts, queries that see no candidate included (den 0)."""
    q = torch.randn(2, 3, 2, 9, 8, generator=gen, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(2, 3, 11, 8, generator=gen, dtype=torch.float64).to(dtype) for _ in "kv")
    visible = torch.rand(2, 9, 11, generator=gen) < 0.4
    visible[0, 3] = False
    visible[1, :, :5] = False
    assert fused_softmax_fits(q, k, v)
    fused = sparse_parts(q.clone(), k, v, visible, 0.3)
    unfused = sparse_parts(q.clone().requires_grad_(), k, v, visible, 0.3)
    assert not fused_softmax_fits(q.requires_grad_(), k, v)
    num_f, den_f, scale_f = fused
    num_u, den_u, scale_u = (x.detach() for x in unfused)
    assert torch.equal(den_f == 0, den_u == 0) and bool((den_f[0, :, :, 3] == 0).all())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    total_f = (num_f * scale_f.exp()[..., None], den_f * scale_f.exp())
    total_u = (num_u * scale_u.exp()[..., None], den_u * scale_u.exp())
    for a, b in zip(total_f, total_u, strict=True):
        assert rel_err(a, b) < tol


@pytest.mark.parametrize("trial", range(10))
def test_plan_without_ranking_where_every_candidate_fits(trial):
    """A prefill plan whose candidates all fit the cache skips the O(N^2) ranking: the same
    decisions as the ranking form (compact=False), nothing merged."""
    gen = torch.Generator().manual_seed(trial)
    batch, size, seq_len = 3, 12, 5
    cache = SparseKV.empty(batch, 1, 2, size, dtype=torch.float64)
    for row in range(batch):
        used = int(torch.randint(0, size - seq_len + 1, (1,), generator=gen))
        slots = torch.randperm(size, generator=gen)[:used]
        cache.pos[row, slots] = torch.randperm(50, generator=gen)[:used]
        cache.score[row, slots] = torch.randint(0, 3, (used,), generator=gen).double()
    evict_pos = torch.arange(50, 50 + seq_len).expand(batch, -1)
    evict_score = torch.randint(0, 3, (batch, seq_len), generator=gen).double()
    evict_valid = torch.rand(batch, seq_len, generator=gen) < 0.8
    fast = sparse_plan(cache, evict_pos, evict_score, evict_valid)
    slow = sparse_plan(cache, evict_pos, evict_score, evict_valid, compact=False)
    visible = torch.zeros_like(slow.visible)
    visible.scatter_(2, fast.columns[:, None].expand(-1, seq_len, -1), fast.visible)
    assert torch.equal(visible, slow.visible)
    assert not fast.merged_valid.any() and not slow.merged_valid.any()
    for name in ("keep", "pos", "score", "candidates"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
