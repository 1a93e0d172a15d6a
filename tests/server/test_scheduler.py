import random
import subprocess
import sys

import pytest

from server.errors import QueueFullError
from server.request import Request, RequestStatus, SamplingParams
from server.scheduler import ScheduledBatch, Scheduler


class FakePool:
    """Slot pool that fails loudly on double frees."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.free_slots = list(range(num_slots))

    def allocate(self) -> int | None:
        return self.free_slots.pop(0) if self.free_slots else None

    def free(self, slot: int) -> None:
        assert slot not in self.free_slots, f"slot {slot} freed twice"
        self.free_slots.append(slot)

    @property
    def num_free(self) -> int:
        return len(self.free_slots)


def make_scheduler(
    pool: FakePool, max_num_seqs=4, max_num_batched_tokens=32, max_waiting=100, **kwargs
):
    return Scheduler(
        max_num_seqs,
        max_num_batched_tokens,
        max_waiting,
        allocate_slot=pool.allocate,
        free_slot=pool.free,
        **kwargs,
    )


def make_request(request_id, prompt_len: int, max_tokens: int = 4) -> Request:
    return Request(
        str(request_id), list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens)
    )


def step(scheduler: Scheduler, pool: FakePool | None = None) -> ScheduledBatch:
    """One engine step with a fake model: every sampling request gets token 9."""
    batch = scheduler.schedule()
    if pool is not None:
        check_invariants(scheduler, batch, pool)
    scheduler.update_after_step(batch)
    for request in batch.sampling_requests:
        request.append_output_token(9)
        if request.num_output_tokens >= request.sampling_params.max_tokens:
            scheduler.finish(request, RequestStatus.FINISHED_LENGTH)
    return batch


def check_invariants(scheduler: Scheduler, batch: ScheduledBatch, pool: FakePool) -> None:
    assert batch.num_tokens <= scheduler.max_num_batched_tokens
    decoding = {id(r) for r in scheduler.running if r.is_prefill_done}
    assert {id(r) for r in batch.decodes} == decoding
    assert len(scheduler.running) <= scheduler.max_num_seqs
    assert len(scheduler.running) + pool.num_free == pool.num_slots
    for chunk in batch.prefills:
        assert chunk.start == chunk.request.num_computed_tokens and chunk.num_tokens > 0
        assert chunk.is_last == (chunk.end == chunk.request.num_prompt_tokens)


@pytest.mark.parametrize(("tenants", "seed", "count"), [("", 0, 60), ("abc", 1, 80)],
                         ids=["one-tenant", "three-tenants"])  # fmt: skip
def test_random_workload_respects_budget_and_never_starves_decodes(tenants, seed, count):
    """Random prompts and lengths (three tenants: fair scheduling on): every step within the
    budget and never empty while work remains, everything finishes, every slot comes back."""
    rng = random.Random(seed)
    pool = FakePool(4)
    scheduler = make_scheduler(pool, max_num_seqs=4, max_num_batched_tokens=16)
    for i in range(count):
        request = make_request(i, rng.randint(1, 50), rng.randint(1, 10))
        request.tenant = rng.choice(tenants) if tenants else None
        scheduler.add(request)
    for _ in range(3000):
        if not scheduler.has_unfinished():
            break
        assert not step(scheduler, pool).is_empty
    assert not scheduler.has_unfinished()
    assert pool.num_free == 4


def test_long_prompt_is_chunked_while_others_decode():
    pool = FakePool(2)
    scheduler = make_scheduler(pool, max_num_seqs=2, max_num_batched_tokens=10)
    short = make_request("short", 3, max_tokens=100)
    scheduler.add(short)
    step(scheduler)
    assert short.num_output_tokens == 1
    long = make_request("long", 50)
    scheduler.add(long)
    starts = []
    while not long.is_prefill_done:
        batch = step(scheduler)
        assert batch.decodes == [short]
        assert [c.request for c in batch.prefills] == [long]
        starts.append(batch.prefills[0].start)
        assert batch.num_tokens <= 10
    assert starts == list(range(0, 50, 9))
    assert long.num_output_tokens == 1 and long.num_computed_tokens == 50


def test_chunk_ending_at_prompt_end_samples():
    pool = FakePool(1)
    scheduler = make_scheduler(pool, max_num_seqs=1, max_num_batched_tokens=5)
    request = make_request("a", 10)
    scheduler.add(request)
    first = scheduler.schedule()
    scheduler.update_after_step(first)
    second = scheduler.schedule()
    assert [(c.start, c.num_tokens, c.is_last) for c in first.prefills] == [(0, 5, False)]
    assert [(c.start, c.num_tokens, c.is_last) for c in second.prefills] == [(5, 5, True)]
    assert first.sampling_requests == [] and second.sampling_requests == [request]
    assert second.prefills[0].token_ids == list(range(6, 11))


def test_prefill_chunk_size_caps_and_aligns_chunks():
    pool = FakePool(2)
    scheduler = make_scheduler(pool, max_num_batched_tokens=6, prefill_chunk_size=4)
    a, b = make_request("a", 9), make_request("b", 9)
    scheduler.add(a)
    scheduler.add(b)
    spans = []
    while not (a.is_prefill_done and b.is_prefill_done):
        spans.append([(c.request.request_id, c.start, c.end) for c in step(scheduler).prefills])
    # Ends land on multiples of 4 unless the budget or the prompt's end cuts them.
    assert spans[0] == [("a", 0, 4), ("b", 0, 2)]
    assert spans[1] == [("a", 4, 8), ("b", 2, 4)]


def test_fcfs_admission_and_slot_limit():
    pool = FakePool(2)
    scheduler = make_scheduler(pool, max_num_seqs=4, max_num_batched_tokens=64)
    requests = [make_request(i, 3, max_tokens=2) for i in range(6)]
    for request in requests:
        scheduler.add(request)
    admitted = []
    while scheduler.has_unfinished():
        batch = step(scheduler)
        admitted += batch.admitted
        assert len(scheduler.running) <= 2
    assert admitted == requests


def test_max_num_seqs_limits_running_even_with_free_slots():
    pool = FakePool(8)
    scheduler = make_scheduler(pool, max_num_seqs=3, max_num_batched_tokens=64)
    for i in range(5):
        scheduler.add(make_request(i, 2, max_tokens=50))
    step(scheduler)
    assert scheduler.num_running == 3 and scheduler.num_waiting == 2 and pool.num_free == 5


def test_thousand_short_requests_through_four_slots_free_every_slot():
    pool = FakePool(4)
    scheduler = make_scheduler(pool, max_num_seqs=4, max_num_batched_tokens=8, max_waiting=1000)
    rng = random.Random(1)
    for i in range(1000):
        scheduler.add(make_request(i, rng.randint(1, 6), rng.randint(1, 3)))
    steps = 0
    while scheduler.has_unfinished():
        step(scheduler, pool)
        steps += 1
    assert pool.num_free == 4 and sorted(pool.free_slots) == [0, 1, 2, 3]
    assert steps < 5000


def test_abort_frees_slot_in_every_phase():
    pool = FakePool(3)
    scheduler = make_scheduler(pool, max_num_seqs=3, max_num_batched_tokens=5)
    decoding, prefilling = make_request("dec", 2, 100), make_request("pre", 40)
    scheduler.add(decoding)
    step(scheduler)
    scheduler.add(prefilling)
    step(scheduler)
    scheduler.add(make_request("wait", 2))
    for i in range(3):
        scheduler.add(make_request(f"w{i}", 2))
    assert decoding.num_output_tokens == 2 and 0 < prefilling.num_computed_tokens < 40

    waiting = scheduler.abort("wait")
    assert waiting.status is RequestStatus.FINISHED_ABORTED and waiting.slot is None
    assert waiting.finish_reason == "abort"
    for request in (prefilling, decoding):
        free_before = pool.num_free
        assert scheduler.abort(request.request_id) is request
        assert request.slot is None and pool.num_free == free_before + 1
        assert request not in scheduler.running
    assert scheduler.abort("dec") is None
    assert scheduler.num_running == 0 and scheduler.num_waiting == 3
    while scheduler.has_unfinished():
        step(scheduler)
    assert pool.num_free == 3


def test_abort_between_schedule_and_update_does_not_advance():
    pool = FakePool(1)
    scheduler = make_scheduler(pool, max_num_seqs=1, max_num_batched_tokens=4)
    request = make_request("a", 10)
    scheduler.add(request)
    batch = scheduler.schedule()
    scheduler.abort("a")
    scheduler.update_after_step(batch)
    assert request.num_computed_tokens == 0 and pool.num_free == 1


def test_queue_full_raises_and_loses_nothing():
    pool = FakePool(2)
    scheduler = make_scheduler(pool, max_num_seqs=2, max_num_batched_tokens=16, max_waiting=3)
    accepted = []
    for i in range(3):
        assert scheduler.can_accept()
        accepted.append(make_request(i, 4, 2))
        scheduler.add(accepted[-1])
    assert not scheduler.can_accept()
    with pytest.raises(QueueFullError, match="3 requests"):
        scheduler.add(make_request("overflow", 4))
    assert scheduler.get("overflow") is None
    step(scheduler)  # admits two: room for two more in the queue
    assert scheduler.can_accept(2) and not scheduler.can_accept(3)
    while scheduler.has_unfinished():
        step(scheduler)
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in accepted)
    assert all(r.num_output_tokens == 2 for r in accepted)


def test_duplicate_request_id_rejected():
    scheduler = make_scheduler(FakePool(1))
    scheduler.add(make_request("a", 2))
    with pytest.raises(ValueError, match="already"):
        scheduler.add(make_request("a", 2))


def test_on_admit_can_skip_a_cached_prefix():
    def restore(request: Request) -> None:
        request.num_computed_tokens = 8

    pool = FakePool(1)
    scheduler = make_scheduler(pool, max_num_batched_tokens=32, on_admit=restore)
    request = make_request("a", 10)
    scheduler.add(request)
    batch = scheduler.schedule()
    assert [(c.start, c.num_tokens, c.is_last) for c in batch.prefills] == [(8, 2, True)]


def test_on_admit_must_leave_a_prompt_token():
    def restore_all(request: Request) -> None:
        request.num_computed_tokens = request.num_prompt_tokens

    scheduler = make_scheduler(FakePool(1), on_admit=restore_all)
    scheduler.add(make_request("a", 4))
    with pytest.raises(RuntimeError, match="at least one prompt token"):
        scheduler.schedule()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 8, 1), "max_num_seqs"),
        ((4, 3, 1), "max_num_batched_tokens"),
        ((4, 8, 0), "max_waiting"),
    ],
)
def test_invalid_limits(args, message):
    pool = FakePool(1)
    with pytest.raises(ValueError, match=message):
        Scheduler(*args, allocate_slot=pool.allocate, free_slot=pool.free)


def test_scheduler_module_does_not_import_torch():
    code = "import sys, server.scheduler; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def tenant_request(request_id, tenant, prompt_len: int, max_tokens: int = 4) -> Request:
    request = make_request(request_id, prompt_len, max_tokens)
    request.tenant = tenant
    return request


def test_a_tenant_with_fewer_running_sequences_is_admitted_first():
    pool = FakePool(8)
    scheduler = make_scheduler(pool, max_num_seqs=3, max_num_batched_tokens=64)
    scheduler.add(tenant_request("a1", "a", 4, max_tokens=100))
    step(scheduler)
    for i in range(3):
        scheduler.add(tenant_request(f"a{i + 2}", "a", 4))
    scheduler.add(tenant_request("b1", "b", 4))
    batch = step(scheduler)  # "a" holds one sequence, "b" none: b1 before a2, a3
    assert [r.request_id for r in batch.admitted] == ["b1"]
    assert [c.request.request_id for c in batch.prefills] == ["b1"]


def test_a_tenant_holding_more_sequences_prefills_in_another_step():
    pool = FakePool(8)
    scheduler = make_scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64)
    for i in range(2):
        scheduler.add(tenant_request(f"a{i}", "a", 4, max_tokens=100))
    step(scheduler)
    scheduler.add(tenant_request("a2", "a", 20))  # "a" would hold 3
    scheduler.add(tenant_request("b0", "b", 20))  # "b" 1: it prefills alone
    batch = step(scheduler)
    assert [c.request.request_id for c in batch.prefills] == ["b0"]
    assert {r.request_id for r in batch.decodes} == {"a0", "a1"}  # decodes still run
    batch = step(scheduler)
    assert [c.request.request_id for c in batch.prefills] == ["a2"]


def test_a_running_prefill_of_a_busier_tenant_waits_for_a_newcomer():
    pool = FakePool(8)
    scheduler = make_scheduler(
        pool, max_num_seqs=8, max_num_batched_tokens=16, prefill_chunk_size=8
    )
    scheduler.add(tenant_request("a0", "a", 4, max_tokens=100))
    step(scheduler)
    scheduler.add(tenant_request("a1", "a", 40))
    first = step(scheduler)
    assert [c.request.request_id for c in first.prefills] == ["a1"]
    scheduler.add(tenant_request("b0", "b", 8))
    batch = step(scheduler)  # b0 (1 sequence) before a1 (2), which waits a step
    assert [c.request.request_id for c in batch.prefills] == ["b0"]
    batch = step(scheduler)
    assert [c.request.request_id for c in batch.prefills] == ["a1"]


def test_equal_tenants_share_a_step_and_one_tenant_is_fcfs():
    pool = FakePool(8)
    scheduler = make_scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64)
    for name in ("a0", "b0", "a1"):
        scheduler.add(tenant_request(name, name[0], 4))
    batch = step(scheduler)  # a0 (a: 1), b0 (b: 1), then a1 (a: 2) waits
    assert [c.request.request_id for c in batch.prefills] == ["a0", "b0"]
    pool = FakePool(8)
    scheduler = make_scheduler(pool, max_num_seqs=8, max_num_batched_tokens=64)
    for i in range(5):
        scheduler.add(tenant_request(i, "a", 4))
    batch = step(scheduler)
    assert [c.request.request_id for c in batch.prefills] == ["0", "1", "2", "3", "4"]
