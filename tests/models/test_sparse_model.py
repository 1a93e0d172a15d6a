"""The LLN+Diag decoder with a sparse cache scored by the model's own surprise (tiny models)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lln_core.ops import slot_softmax
from models import LLNConfig
from models.modeling_lln import compiled_plan_step, plan_piece
from models.selection import SurpriseState
from tests.models.conftest import tiny_model
from tests.models.test_modeling import (
    assert_batched_equals_alone,
    assert_generate_matches_manual_loop,
    incremental_logits,
)

SPARSE = dict(local_size=6, num_sinks=2, sparse_cache_size=3, sparse_span=1)
KV_DTYPES = pytest.mark.parametrize("kv", ["auto", "bfloat16"])
# far keys where they were written, all at one distance, or the sparse cache's at grouped
# distances whose group doubles within 40 tokens (`lln_core/ops/far.py`)
FAR = pytest.mark.parametrize("far", ["original", "fixed", "grouped"])
FIXED = dict(far_positions="fixed", far_distance=9, far_sink_distance=7)
GROUPED = dict(FIXED, far_positions="grouped", far_group=2, far_max_distance=12)


def sparse_model(dtype=torch.float64, far="original", **overrides):
    far_config = {"fixed": FIXED, "grouped": GROUPED}.get(far, {})
    return tiny_model("lln_diag", dtype=dtype, **{**SPARSE, **far_config, **overrides})


def surprise(model, ids):
    """The reference score input: -log p(x_t | x_<t) from one full forward (0 at t = 0)."""
    logits = model(ids).logits.double().log_softmax(-1)
    nll = -logits[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(ids.shape[0], 1, dtype=nll.dtype), nll], dim=1)


@FAR
@KV_DTYPES
@pytest.mark.parametrize("splits", [(1,), (4, 11), (13, 14, 30)])
def test_full_equals_prefill_then_steps_float64(splits, kv, far):
    """Pieces and decode steps make the same cache decisions as one long forward (with
    bfloat16 storage too: keys and values are rounded once, where they are made)."""
    model = sparse_model(kv_cache_dtype=kv, far=far)
    ids = torch.randint(0, 64, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        stepped, states = incremental_logits(model, ids, splits)
    assert (full - stepped).abs().max() < 1e-10
    assert isinstance(states[-1], SurpriseState)
    assert int((states[0].sparse.pos >= 0).sum()) == 2 * 3  # full caches


def test_cache_holds_the_most_surprising_spans():
    """After a long input the cache holds the G old tokens with the highest span scores,
    computed here from one plain forward's next-token losses."""
    model = sparse_model(sparse_cache_size=4, sparse_span=1)
    ids = torch.randint(0, 64, (1, 60), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, states = model.forward_states(ids)
        nll = surprise(model, ids)[0]
    old = range(2, 60 - 6)  # left the window, sinks excluded
    padded = torch.cat([torch.zeros(1, dtype=nll.dtype), nll, torch.zeros(1, dtype=nll.dtype)])
    score = {p: max(padded[p : p + 3].tolist()) + nll[p].item() / 1024 for p in old}
    best = sorted(old, key=lambda p: (score[p], p), reverse=True)[:4]
    for layer_state in states[:-1]:
        assert sorted(layer_state.sparse.pos[0].tolist()) == sorted(best)


@FAR
@KV_DTYPES
def test_batched_different_lengths_equal_each_alone(kv, far):
    assert_batched_equals_alone(sparse_model(kv_cache_dtype=kv, far=far), tol=1e-10)


# fixed and grouped far positions with the default's bfloat16 storage only: each compiled
# case costs a compilation of its own
@pytest.mark.parametrize(
    ("kv", "far"),
    [("auto", "original"), ("bfloat16", "original"), ("bfloat16", "fixed"),
     ("bfloat16", "grouped")],
)  # fmt: skip
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_decode_paths_agree(compiled, kv, far):
    """Compiled and in-place decode steps equal eager copying ones (float32)."""
    eager = sparse_model(dtype=torch.float32, kv_cache_dtype=kv, far=far)
    other = sparse_model(dtype=torch.float32, kv_cache_dtype=kv, far=far)
    if compiled:
        assert other.compile_decode()
    # compiled float32 keys differ from eager ones in the last bits; stored in bfloat16, a key
    # near a rounding tie then differs by one bfloat16 step, and so do the LLN sums it joins
    tol = 1e-4 if kv == "auto" else 4e-3
    ids = torch.randint(0, 64, (3, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, states = eager.forward_states(ids[:, :12], lengths=torch.tensor([12, 7, 3]))
        expected_states, actual_states = states, [s.clone() for s in states]
        for t in range(12, 30):
            expected, expected_states = eager.forward_states(ids[:, t : t + 1], expected_states)
            actual, actual_states = other.forward_states(
                ids[:, t : t + 1], actual_states, in_place=True
            )
            assert (actual - expected).abs().max() < 1e-4
    for want, got in zip(expected_states, actual_states, strict=True):
        for a, b in zip(want.flat(), got.flat(), strict=True):
            assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


@FAR
@KV_DTYPES
def test_compiled_decode_attends_through_the_slot_kernel(kv, far):
    """With head dims the AVX-512 kernel takes (16 here), a float32 compiled decode step reads
    the window, the sinks past it and the cache through `lln::slot_softmax` (three calls per
    layer, profiler) and
    follows the float64 model, which takes PyTorch's path, to float32 rounding (and bfloat16's,
    where the stored keys are rounded the same way in both). With bfloat16 slots, as the server
    runs it on a CPU, the step's host code is C++ (`cpp_wrapper`)."""
    if not slot_softmax.available():
        pytest.skip("the CPU has no AVX-512 (or no C++ compiler)")
    wide = dict(hidden_size=64, kv_cache_dtype=kv, far=far)
    reference, model = sparse_model(**wide), sparse_model(dtype=torch.float32, **wide)
    model.load_state_dict(reference.state_dict())
    assert model.compile_decode(cpp_wrapper=kv == "bfloat16")
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        _, want_states = reference.forward_states(ids[:, :14])
        _, states = model.forward_states(ids[:, :14])
        for t in range(14, 24):
            token = ids[:, t : t + 1]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                got, states = model.forward_states(token, states, in_place=True)
            want, want_states = reference.forward_states(token, want_states)
            assert (got.double() - want).abs().max() < 1e-4
            calls = {e.key: e.count for e in prof.key_averages()}
            if t > 16:  # the first steps also trace the op (and retrace it, dynamic)
                assert calls.get("lln::slot_softmax") == 3 * model.config.num_hidden_layers


def test_compiled_plan_of_a_decode_step_equals_the_eager_plan():
    """A decode step's scoring and plan run compiled (`compiled_plan_step`): the same plan, and
    the same surprise up to float32 rounding, at batch 1 and at a batch of rows with full,
    partly full and empty caches."""
    model = sparse_model(dtype=torch.float32)
    ids = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(5))
    sizes = {"window": 6, "num_sinks": 2, "span": 1}
    with torch.no_grad():
        for rows, lengths in ((1, None), (3, torch.tensor([40, 9, 3]))):
            _, states = model.forward_states(ids[:rows], lengths=lengths)
            token = torch.randint(0, 64, (rows, 1), generator=torch.Generator().manual_seed(6))
            args = (states[-1], token, states[0].num_tokens, states[0].sparse, model.lm_head)
            eager_tracker, eager_plan = plan_piece(*args, None, **sizes)
            tracker, plan = compiled_plan_step(*args, **sizes)
            for want, got in zip(eager_plan.flat(), plan.flat(), strict=True):
                assert torch.equal(want, got)
            for want, got in zip(eager_tracker.flat(), tracker.flat(), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_generate_greedy_matches_manual_loop():
    assert_generate_matches_manual_loop(sparse_model(), new_tokens=10)


def test_state_bytes_do_not_grow():
    model = sparse_model(dtype=torch.float32, chunk_size=64)
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        small = model(torch.randint(0, 64, (1, 10), generator=gen)).past_key_values.nbytes
        out = model(torch.randint(0, 64, (1, 10_000), generator=gen))
    assert out.past_key_values.get_seq_length() == 10_000
    assert out.past_key_values.nbytes == small


def test_bfloat16_storage_halves_the_exact_pairs_and_stays_close():
    """Window and cache keys/values are stored in bfloat16 (the LLN state stays float32);
    outputs move by the rounding of keys and values only."""
    exact = sparse_model(dtype=torch.float32)
    half = sparse_model(dtype=torch.float32, kv_cache_dtype="bfloat16")
    half.load_state_dict(exact.state_dict())
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        a, b = exact(ids), half(ids)
    state_a, state_b = a.past_key_values.states[0], b.past_key_values.states[0]
    for name in ("local", "sparse"):
        assert getattr(state_b, name).k.dtype == torch.bfloat16
        assert getattr(state_b, name).v.nbytes * 2 == getattr(state_a, name).v.nbytes
    assert state_b.S.dtype == torch.float32 and state_b.sparse.score.dtype == torch.float32
    assert torch.equal(state_a.sparse.pos, state_b.sparse.pos)
    assert 0 < (a.logits - b.logits).abs().max() < 0.05


def test_save_and_load_keeps_the_cache_config(tmp_path):
    model = sparse_model(dtype=torch.float32, far="fixed")
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    assert loaded.config.sparse_cache_size == 3 and loaded.config.sparse_span == 1
    assert loaded.config.far_positions == "fixed" and loaded.config.far_distance == 9
    ids = torch.randint(0, 64, (1, 25), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits)


def test_config_rejects_bad_sparse_settings():
    with pytest.raises(ValueError, match="sparse_select"):
        LLNConfig(sparse_cache_size=4, sparse_select="sre")
    with pytest.raises(ValueError, match="joint"):
        LLNConfig(sparse_cache_size=4, combine="average", local_kind="block")
    with pytest.raises(ValueError, match="window"):
        LLNConfig(sparse_cache_size=4, local_size=8, sparse_span=8)
    with pytest.raises(ValueError, match=">= 0"):
        LLNConfig(sparse_cache_size=-1)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLNConfig(kv_cache_dtype="float16")
    with pytest.raises(ValueError, match="far_positions"):
        LLNConfig(far_positions="near")
    with pytest.raises(ValueError, match="far_distance"):
        LLNConfig(far_distance=-1)
    # fixed far positions are part of the joint normalisation only
    assert not LLNConfig(
        combine="average", local_kind="block", far_positions="fixed"
    ).uses_far_positions
    # the teacher run on a sparse checkpoint's weights ignores the setting
    assert not LLNConfig(attention_kernel="softmax", sparse_cache_size=4).uses_sparse_cache


def test_surprise_from_bfloat16_logits_equals_a_float64_reference():
    """With a bfloat16-GEMM LM head the scores reduce its bfloat16 logits directly (a compiled
    log-sum-exp): the same surprises as float64 arithmetic on those logits."""
    from torch import nn

    from models.quantize import MIN_BF16_ROWS, Bf16GemmLinear
    from models.selection import record_surprise

    gen = torch.Generator().manual_seed(3)
    head = Bf16GemmLinear(nn.Linear(32, 500, bias=False))
    seq_len = MIN_BF16_ROWS + 7
    hidden = torch.randn(1, seq_len, 32, generator=gen)
    ids = torch.randint(0, 500, (1, seq_len), generator=gen)
    state = SurpriseState.empty(1, seq_len + 1, 32, "cpu")
    with torch.no_grad():
        state, last = record_surprise(
            state, hidden, ids, torch.zeros(1, dtype=torch.long), None, head
        )
        logits = head(hidden)[0].double()  # the bfloat16 GEMM's numbers, widened
    want = torch.logsumexp(logits[:-1], -1) - logits[:-1].gather(-1, ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(state.surprise[0, 1:seq_len].double(), want, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(last[0].double(), logits[-1])
    torch.testing.assert_close(state.lse[0].double(), torch.logsumexp(logits[-1], -1))
