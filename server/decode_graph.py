"""Decode as one static, in-place step per batch-size bucket; on CUDA, one CUDA graph each.

A step reads its rows of the slot pool through a slot-index buffer (index_select), runs the
model's one-token step on them and writes back what one token changed (`write_step_`), all on
the device and without a host sync, so that a CUDA graph can hold the whole step: a replay is
one launch instead of Python, per-layer guard checks and hundreds of kernel launches.

Inputs live in fixed buffers: token ids and slot indices, one row per sequence; a batch is
padded to its bucket with rows that decode token 0 in the pool's pad slot. Every pad row reads
the same state and token, so its writes agree and no real slot is touched. Positions are not
an input: each row's position is its state's token count, read on the device (a host copy of it
would be a second source of truth).
"""

from __future__ import annotations

import bisect

import torch
from torch import Tensor

from models.modeling_lln import LLNForCausalLM
from server.state_pool import StatePool, first_if_consecutive

SMALL_BUCKETS = (1, 2, 4, 8)
BUCKET_STEP = 16


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes a step is padded to: 1, 2, 4, 8, then steps of 16, and max_batch itself."""
    small = [b for b in SMALL_BUCKETS if b < max_batch]
    large = range(BUCKET_STEP, max_batch, BUCKET_STEP)
    return sorted({*small, *large, max_batch})


class StaticDecoder:
    """One decode token for up to `max_batch` sequences, from and into `pool`'s slots.

    use_graphs: capture each bucket as a CUDA graph at construction (CUDA only). pad: run
    every batch at its bucket's size; default: only with graphs (on CPU the padding rows would
    be computed for nothing).
    """

    def __init__(
        self,
        model: LLNForCausalLM,
        pool: StatePool,
        max_batch: int,
        *,
        use_graphs: bool = False,
        pad: bool | None = None,
    ) -> None:
        if use_graphs and pool.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.model, self.pool = model, pool
        self.buckets = batch_buckets(max_batch)
        self.pad = use_graphs if pad is None else pad
        size, device = self.buckets[-1], pool.device
        # row 0: token ids, row 1: slots; one host-to-device copy per step
        self.inputs = torch.zeros(2, size, dtype=torch.long, device=device)
        self._staging = torch.zeros(2, size, dtype=torch.long)
        self._copied: torch.cuda.Event | None = None
        if device.type == "cuda":
            self._staging = self._staging.pin_memory()
            self._copied = torch.cuda.Event()
        self.logits = torch.zeros(size, model.config.vocab_size, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if use_graphs:
            self.capture()

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket(self, batch: int) -> int:
        """The smallest bucket that holds `batch` rows."""
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"a decode batch holds 1..{self.max_batch} rows, got {batch}")
        return self.buckets[bisect.bisect_left(self.buckets, batch)]

    @torch.no_grad()
    def run(self, token_ids: list[int], slots: list[int]) -> Tensor:
        """Row i decodes token_ids[i] in slots[i] (distinct slots); returns logits [n, V]
        float32 in that order, a view of a buffer that the next step overwrites."""
        batch = len(slots)
        if not self.pad:  # in slot order: consecutive slots are then read as views
            order = sorted(range(batch), key=slots.__getitem__)
            token_ids, slots = [token_ids[i] for i in order], [slots[i] for i in order]
        size = self.bucket(batch) if self.pad else batch
        self._load(token_ids, slots, size)
        graph = self.graphs.get(size)
        if graph is not None:
            graph.replay()
        else:
            self.step(size, None if self.pad else first_if_consecutive(slots))
        if self.pad or order == list(range(batch)):  # in order: a view, not a [n, V] gather
            return self.logits[:batch]
        inverse = torch.empty(batch, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(batch)
        return self.logits[inverse.to(self.logits.device)]

    def step(self, size: int, first: int | None = None) -> None:
        """The step over the first `size` rows of the buffers: everything between the input
        and the logits buffer, device work only (what a graph captures). first: the rows are
        the pool's slots first.. first + size - 1, read as views instead of copies (eager only:
        a graph's slots change from replay to replay; on CPU the copy of a 32 MiB state costs
        a few ms per sequence and step)."""
        ids, index = self.inputs[0, :size, None], self.inputs[1, :size]
        if first is None:
            states = [state.index_select(index) for state in self.pool.states]
        else:
            states = [state.rows(first, size) for state in self.pool.states]
        logits, new_states = self.model.forward_states(ids, states, in_place=True)
        for pool_state, old, new in zip(self.pool.states, states, new_states, strict=True):
            if first is None:
                pool_state.write_step_(index, new)
            else:  # the step wrote the windows and caches into the pool's rows already
                old.assign_(new)
        self.logits[:size].copy_(logits[:, -1])

    @torch.no_grad()
    def capture(self) -> None:
        """One graph per bucket, largest first, sharing one memory pool (nano-vllm's order: the
        largest sets the pool's size, the smaller ones fit in it). Warm-up runs first: it
        compiles the layers for the bucket's shape and settles the allocator. Warm-up and
        capture decode pad rows only, so they touch the pad slot alone."""
        memory_pool = None
        for size in reversed(self.buckets):
            self._load([], [], size)
            for _ in range(2):
                self.step(size)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory_pool):
                self.step(size)
            memory_pool = graph.pool() if memory_pool is None else memory_pool
            self.graphs[size] = graph
        torch.cuda.synchronize()

    def _load(self, token_ids: list[int], slots: list[int], size: int) -> None:
        """Fill the first `size` rows of the input buffers; rows past the batch are padding."""
        batch = len(slots)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the staging buffer
        staging = self._staging[:, :size]
        staging[0, :batch] = torch.as_tensor(token_ids, dtype=torch.long)
        staging[1, :batch] = torch.as_tensor(slots, dtype=torch.long)
        staging[0, batch:] = 0
        staging[1, batch:] = self.pool.pad_slot
        self.inputs[:, :size].copy_(staging, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
