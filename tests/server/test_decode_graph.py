"""The static in-place decode step (`server/decode_graph.py`) against the model's plain
`forward_states` on gathered copies: same tokens, same states, padding that touches nothing
real, no host sync inside the step. On CUDA (`gpu`), graph replay against the eager step."""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from server.decode_graph import StaticDecoder, batch_buckets
from server.request import SamplingParams
from server.sampler import Sampler
from server.state_pool import StatePool
from tests.models.conftest import tiny_model

VOCAB = 29
MAX_SEQS = 20  # buckets 1, 2, 4, 8, 16, 20
# ops that make the host wait for the device or copy host data to it: none may run in a step
SYNC_OPS = (
    "nonzero",
    "_local_scalar_dense",
    "is_nonzero",
    "masked_select",
    "equal",
    "unique",
    "lift_fresh",
)  # lift_fresh: a tensor made from host data (a copy to the device)


def lln_diag(sparse: int = 0, kv: str = "auto", device: str = "cpu"):
    return tiny_model("lln_diag", dtype=torch.float32, vocab_size=VOCAB, local_size=4,
                      num_sinks=1, sparse_cache_size=sparse, sparse_span=1,
                      kv_cache_dtype=kv).to(device)  # fmt: skip


MODELS = {
    "window": lambda: lln_diag(),
    "window+sparse-bf16": lambda: lln_diag(sparse=3, kv="bfloat16"),
    "block-average": lambda: tiny_model(
        "lln_diag",
        dtype=torch.float32,
        vocab_size=VOCAB,
        combine="average",
        local_kind="block",
        local_size=4,
    ),
    "lln": lambda: tiny_model("lln", dtype=torch.float32, vocab_size=VOCAB),
    "ea": lambda: tiny_model("ea", dtype=torch.float32, vocab_size=VOCAB),
}


@pytest.fixture(params=list(MODELS), scope="module")
def model(request):
    return MODELS[request.param]()


class Reference:
    """Today's decode without the static path: gather copies, plain forward, full scatter."""

    def __init__(self, model, pool: StatePool) -> None:
        self.model, self.pool = model, pool

    @torch.no_grad()
    def run(self, token_ids: list[int], slots: list[int]) -> torch.Tensor:
        ids = torch.tensor(token_ids, device=self.pool.device)[:, None]
        states = [s.index_select(self.pool._index(slots)) for s in self.pool.states]
        logits, states = self.model.forward_states(ids, states)
        self.pool.scatter(slots, states)
        return logits[:, -1].float()


@torch.no_grad()
def prefill(model, pools: list[StatePool], slot: int, prompt: list[int]) -> list[int]:
    """The prompt into `slot` of every pool (the same states); its greedy next token."""
    logits, states = model.forward_states(torch.tensor([prompt], device=pools[0].device))
    for pool in pools:
        pool.scatter([slot], states)
    return [int(logits[0, -1].argmax())]


def assert_slots_close(a: StatePool, b: StatePool, slots: list[int]) -> None:
    index = a._index(slots)
    for state_a, state_b in zip(a.states, b.states, strict=True):
        for x, y in zip(state_a.index_select(index).flat(), state_b.index_select(index).flat(),
                        strict=True):  # fmt: skip
            if x.is_floating_point():
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, equal_nan=True)
            else:
                assert torch.equal(x, y)


def slot_rows(pool: StatePool, slots: list[int]) -> list[torch.Tensor]:
    index = pool._index(slots)
    return [t.clone() for s in pool.states for t in s.index_select(index).flat()]


# (sequences that join, sequences that finish) per step: batches of 1, 3, 5, 8, 13, 20, 17,
# 11 and 2 rows hit every bucket, padded and exact
SCHEDULE = [(1, 0), (0, 0), (2, 0), (2, 0), (4, 1), (5, 0), (7, 0), (0, 3), (3, 0), (0, 0),
            (0, 12), (3, 0), (0, 0), (0, 9)]  # fmt: skip


def run_against_reference(model, sample, *, pad: bool = True, seed: int = 0, ref_model=None):
    """Decode the same schedule through StaticDecoder and the reference (on ref_model, default
    model), each on its own pool; sample(logits, slots, step) -> tokens. Checks tokens, live
    states and untouched slots each step."""
    ref_model = model if ref_model is None else ref_model
    pool, ref_pool = StatePool(model, MAX_SEQS), StatePool(ref_model, MAX_SEQS)
    decoder = StaticDecoder(model, pool, MAX_SEQS, pad=pad)
    reference = Reference(ref_model, ref_pool)
    rng = random.Random(seed)
    free = list(range(MAX_SEQS))
    rng.shuffle(free)  # slots in no order: never consecutive by luck
    live: dict[int, list[int]] = {}  # slot -> tokens so far
    for step, (joins, leaves) in enumerate(SCHEDULE):
        for slot in rng.sample(sorted(live), leaves):
            del live[slot]
            free.append(slot)
        for _ in range(joins):
            slot = free.pop(0)
            prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 9))]
            live[slot] = prefill(model, [pool, ref_pool], slot, prompt)
        slots = list(live)
        rng.shuffle(slots)
        idle = [s for s in range(MAX_SEQS) if s not in live]
        idle_before = slot_rows(pool, idle)
        token_ids = [live[s][-1] for s in slots]
        logits = decoder.run(token_ids, slots)
        expected = reference.run(token_ids, slots)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
        tokens, expected_tokens = sample(logits, slots, step), sample(expected, slots, step)
        assert tokens == expected_tokens, step
        for slot, token in zip(slots, tokens, strict=True):
            live[slot].append(token)
        assert_slots_close(pool, ref_pool, slots)
        for before, after in zip(idle_before, slot_rows(pool, idle), strict=True):
            assert torch.equal(before, after)  # the pad rows wrote nothing into a real slot


def greedy(logits, slots, step) -> list[int]:
    return logits.argmax(dim=-1).tolist()


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]


def test_batch_goes_to_the_smallest_bucket_that_holds_it():
    model = lln_diag()
    decoder = StaticDecoder(model, StatePool(model, MAX_SEQS), MAX_SEQS, pad=True)
    assert [decoder.bucket(n) for n in (1, 3, 5, 8, 9, 17, 20)] == [1, 4, 8, 8, 16, 20, 20]
    with pytest.raises(ValueError):
        decoder.bucket(21)


@pytest.mark.parametrize("pad", [True, False], ids=["padded", "exact"])
def test_static_step_equals_plain_forward_greedy(model, pad):
    run_against_reference(model, greedy, pad=pad)


def test_static_step_equals_plain_forward_seeded_sampling(model):
    sampler = Sampler(seed=0)
    params = SamplingParams(temperature=0.8, top_k=10, top_p=0.9, seed=5)

    def sample(logits, slots, step) -> list[int]:
        # a generator per (slot, step): both runs draw the same numbers for the same row
        gens = [sampler.make_generator(1000 * step + slot) for slot in slots]
        rows = len(slots)
        empty = [[] for _ in range(rows)]
        return sampler(logits, [params] * rows, empty, empty, gens).token_ids.tolist()

    run_against_reference(model, sample, seed=1)


def test_pad_slot_is_not_a_slot():
    model = lln_diag(sparse=3)
    pool = StatePool(model, 4)
    slots = [pool.allocate() for _ in range(4)]
    assert pool.pad_slot not in slots and pool.allocate() is None
    assert pool.total_bytes == 4 * pool.bytes_per_slot
    assert all(s.batch_size == 5 for s in pool.states)


class SyncOps(TorchDispatchMode):
    """Records the ops that make the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in SYNC_OPS:
            self.found.add(name)
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_step_has_no_host_sync(model):
    pool = StatePool(model, 4)
    decoder = StaticDecoder(model, pool, 4, pad=True)
    for slot, length in zip((0, 2, 3), (1, 5, 11), strict=True):  # sinks, ring, wrapped
        prefill(model, [pool], slot, [3] * length)
    decoder._load([5, 6, 7], [3, 0, 2], 4)
    with SyncOps() as mode:
        for _ in range(6):
            decoder.step(4)
    assert not mode.found


# ---- CUDA: graph replay against the eager step, every bucket --------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("compiled", [False, True], ids=["eager-layers", "compiled-layers"])
@torch.no_grad()
def test_graph_replay_equals_eager_step_on_cuda(name, compiled):
    model = MODELS[name]().to("cuda")
    model.compile_decode(compiled)
    graph_pool, eager_pool = StatePool(model, MAX_SEQS), StatePool(model, MAX_SEQS)
    graphs = StaticDecoder(model, graph_pool, MAX_SEQS, use_graphs=True)
    eager = StaticDecoder(model, eager_pool, MAX_SEQS, pad=True)
    assert sorted(graphs.graphs) == graphs.buckets
    rng = random.Random(0)
    slots = rng.sample(range(MAX_SEQS), MAX_SEQS)
    for slot in slots:
        prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 9))]
        prefill(model, [graph_pool, eager_pool], slot, prompt)
    for size in [*graphs.buckets, 3, 13]:  # every bucket, and two batches padded up
        for _ in range(3):
            rows = slots[:size]
            ids = [rng.randrange(VOCAB) for _ in rows]
            torch.testing.assert_close(graphs.run(ids, rows), eager.run(ids, rows),
                                       rtol=1e-4, atol=1e-4)  # fmt: skip
            assert_slots_close(graph_pool, eager_pool, slots)


@pytest.mark.gpu
@torch.no_grad()
def test_eager_step_does_not_sync_on_cuda():
    model = lln_diag(sparse=3, kv="bfloat16", device="cuda")
    pool = StatePool(model, 4)
    decoder = StaticDecoder(model, pool, 4, pad=True)
    prefill(model, [pool], 1, [3] * 7)
    decoder._load([5], [1], 4)
    decoder.step(4)  # first: lazy initialisations may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        decoder.step(4)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_layers_in_the_padded_step_equal_plain_forward():
    model = lln_diag(sparse=3, kv="bfloat16")
    model.compile_decode()
    run_against_reference(model, greedy, seed=2, ref_model=lln_diag(sparse=3, kv="bfloat16"))
