"""Admission, chunked prefill and the decode batch. Torch-free: slots come from callables.

One engine step is: `batch = scheduler.schedule()`, run the model on it, then
`scheduler.update_after_step(batch)`, sample for `batch.sampling_requests`, append the tokens and
call `scheduler.finish(...)` for the requests that stop.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from server.errors import QueueFullError
from server.request import Request, RequestStatus


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [start, start + num_tokens) of `request`, computed this step.

    is_last: the chunk ends at the prompt's end, so the request samples its first token from
    this step's logits at the chunk's last position.
    """

    request: Request
    start: int
    num_tokens: int
    is_last: bool

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.request.prompt_token_ids[self.start : self.end]


@dataclass
class ScheduledBatch:
    """What one step computes: one token per decode, a chunk per prefilling request."""

    decodes: list[Request] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    admitted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.num_tokens for c in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def sampling_requests(self) -> list[Request]:
        """Requests that sample a token this step: every decode, then every finished prefill."""
        return self.decodes + [c.request for c in self.prefills if c.is_last]


class Scheduler:
    """FCFS scheduler, fair among tenants (`schedule`): every running sequence decodes each
    step, prefill gets the rest.

    allocate_slot() returns a free state slot or None; free_slot(slot) gives it back. on_admit
    (optional) runs right after a request gets its slot, before its first chunk is planned: the
    place to restore a prefix-cache snapshot and advance num_computed_tokens (it must leave at
    least one prompt token to compute, since the first output token needs the prompt's last
    logits). prefill_chunk_size, if set, caps a chunk and aligns chunk ends to its multiples.
    whole_chunks: a chunk that does not fit in what is left of the step's token budget waits
    for a later step instead of being cut to fit, so that where a prompt is split depends on
    the prompt alone, not on the other requests (a chunk longer than a step can ever hold is
    cut at `max_chunk`, which depends on the limits alone).
    """

    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_waiting: int,
        allocate_slot: Callable[[], int | None],
        free_slot: Callable[[int], None],
        prefill_chunk_size: int | None = None,
        on_admit: Callable[[Request], None] | None = None,
        whole_chunks: bool = False,
    ) -> None:
        _check_limits(max_num_seqs, max_num_batched_tokens, max_waiting, prefill_chunk_size)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.prefill_chunk_size = prefill_chunk_size
        self.whole_chunks = whole_chunks
        self._allocate_slot = allocate_slot
        self._free_slot = free_slot
        self._on_admit = on_admit
        self.waiting: deque[Request] = deque()
        self.running: deque[Request] = deque()
        self._requests: dict[str, Request] = {}

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def can_accept(self, num_requests: int = 1) -> bool:
        """Whether `num_requests` more fit in the waiting queue; O(1), call it before tokenizing."""
        return len(self.waiting) + num_requests <= self.max_waiting

    def add(self, request: Request) -> None:
        """Queue a request. Raises QueueFullError when max_waiting requests are waiting."""
        if not self.can_accept():
            raise QueueFullError(self.max_waiting)
        if request.request_id in self._requests:
            raise ValueError(f"request_id {request.request_id!r} is already in the engine")
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self._requests[request.request_id] = request

    def add_forked(self, request: Request) -> None:
        """Queue, first in line and past the max_waiting cap, a choice forked from a running
        request (its n was counted when the request was accepted)."""
        if request.request_id in self._requests:
            raise ValueError(f"request_id {request.request_id!r} is already in the engine")
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self._requests[request.request_id] = request

    def schedule(self) -> ScheduledBatch:
        """Plan one step. Never exceeds max_num_batched_tokens; decodes are never starved.

        Tenant-fair: prefill chunks are planned in the order of their tenants' running
        sequences, fewest first (a waiting request counts itself once admitted, and goes
        before a running prefill of a tenant with more; FCFS within a tenant and among equals),
        and a chunk waits for a later step while the step holds a chunk of another tenant with
        fewer running sequences: a tenant's new request is not slowed by the prefills of a
        tenant that already holds more of the server. A request's prefill is deferred only
        while its tenant holds more sequences than another's, which ends when those decode
        to their end. With one tenant (or none), this is FCFS.
        """
        batch = ScheduledBatch(decodes=[r for r in self.running if _is_decoding(r)])
        budget = self.max_num_batched_tokens - len(batch.decodes)
        counts: dict[str | None, int] = {}
        for request in self.running:
            counts[request.tenant] = counts.get(request.tenant, 0) + 1
        prefilling = deque(
            sorted(
                (r for r in self.running if not r.is_prefill_done), key=lambda r: counts[r.tenant]
            )
        )
        planned: set[str | None] = set()  # tenants with a chunk in this step
        admitting = True
        while budget > 0:
            waiting = None
            if admitting and self.waiting and len(self.running) < self.max_num_seqs:
                waiting = self._fairest_waiting(counts)
            head = prefilling[0] if prefilling else None
            if waiting is not None and (
                head is None or counts.get(waiting.tenant, 0) + 1 < counts[head.tenant]
            ):
                if self._defers(waiting.tenant, counts.get(waiting.tenant, 0) + 1, counts, planned):
                    admitting = False  # every other waiting request's tenant holds as many
                    continue
                request = self._admit(waiting)
                if request is None:
                    admitting = False
                    continue
                counts[request.tenant] = counts.get(request.tenant, 0) + 1
                batch.admitted.append(request)
            elif head is not None:
                request = prefilling.popleft()
                if self._defers(request.tenant, counts[request.tenant], counts, planned):
                    continue
            else:
                break
            num_tokens = self._add_chunk(batch, request, budget)
            if num_tokens:
                planned.add(request.tenant)
            budget -= num_tokens
        return batch

    def _fairest_waiting(self, counts: dict[str | None, int]) -> Request:
        """The first waiting request of the tenant with the fewest running sequences."""
        best, fewest = None, None
        for request in self.waiting:
            running = counts.get(request.tenant, 0)
            if fewest is None or running < fewest:
                best, fewest = request, running
                if running == 0:
                    break
        return best

    @staticmethod
    def _defers(tenant, running: int, counts: dict, planned: set) -> bool:
        """Whether a chunk of `tenant` (holding `running` sequences) waits: the step holds a
        chunk of another tenant that holds fewer."""
        return any(counts.get(other, 0) < running for other in planned if other != tenant)

    def update_after_step(self, batch: ScheduledBatch) -> None:
        """Advance num_computed_tokens by what the step computed (skips finished requests)."""
        for request in batch.decodes:
            if not request.is_finished:
                request.num_computed_tokens += 1
        for chunk in batch.prefills:
            if not chunk.request.is_finished:
                chunk.request.num_computed_tokens = chunk.end

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request from whichever queue holds it, free its slot, record why."""
        if not status.is_finished:
            raise ValueError(f"finish needs a finished status, got {status}")
        if self._requests.get(request.request_id) is not request:
            return
        del self._requests[request.request_id]
        queue = self.running if request.status is RequestStatus.RUNNING else self.waiting
        queue.remove(request)
        if request.slot is not None:
            slot, request.slot = request.slot, None
            self._free_slot(slot)
        request.status = status
        request.finish_reason = status.finish_reason

    def abort(self, request_id: str) -> Request | None:
        """Abort a waiting or running request; returns it, or None if it is not here."""
        request = self._requests.get(request_id)
        if request is not None:
            self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    def _admit(self, request: Request) -> Request | None:
        """Give waiting `request` a slot (None: no slot free)."""
        slot = self._allocate_slot()
        if slot is None:
            return None
        if self.waiting[0] is request:
            self.waiting.popleft()
        else:
            del self.waiting[next(i for i, r in enumerate(self.waiting) if r is request)]
        request.slot = slot
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        if self._on_admit is not None:
            self._on_admit(request)
        if request.is_prefill_done and not request.output_token_ids:
            raise RuntimeError(
                f"request {request.request_id!r} was admitted with its whole prompt computed; "
                "leave at least one prompt token so that its first token can be sampled"
            )
        return request

    @property
    def max_chunk(self) -> int:
        """The budget a prefilling request always finds when it is first in line: every other
        slot decoding."""
        return self.max_num_batched_tokens - (self.max_num_seqs - 1)

    def _add_chunk(self, batch: ScheduledBatch, request: Request, budget: int) -> int:
        start = request.num_computed_tokens
        num_tokens = request.num_prefill_tokens_left
        if self.prefill_chunk_size is not None:
            num_tokens = min(num_tokens, self.prefill_chunk_size - start % self.prefill_chunk_size)
        if self.whole_chunks:
            num_tokens = min(num_tokens, self.max_chunk)
            if num_tokens > budget:
                return 0
        num_tokens = min(num_tokens, budget)
        if num_tokens <= 0:
            return 0
        is_last = start + num_tokens == request.num_prompt_tokens
        batch.prefills.append(PrefillChunk(request, start, num_tokens, is_last))
        return num_tokens


def _is_decoding(request: Request) -> bool:
    return request.is_prefill_done and request.num_computed_tokens < request.num_tokens


def _check_limits(
    max_num_seqs: int, max_num_batched_tokens: int, max_waiting: int, chunk: int | None
) -> None:
    for name, value in (("max_num_seqs", max_num_seqs), ("max_waiting", max_waiting)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_num_batched_tokens < max_num_seqs:
        # Otherwise a full decode batch alone would exceed the budget.
        raise ValueError(
            f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= max_num_seqs "
            f"({max_num_seqs})"
        )
    if chunk is not None and chunk < 1:
        raise ValueError(f"prefill_chunk_size must be >= 1, got {chunk}")
