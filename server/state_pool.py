"""A fixed pool of state slots: every layer's recurrent state for `num_slots` sequences,
allocated once at start. Nothing grows with context, so memory is known up front."""

from __future__ import annotations

import torch
from torch import Tensor

from lln_core.state import BatchedState
from models.modeling_lln import LLNForCausalLM

States = list[BatchedState]


class StatePool:
    """Slots are rows of one batched state per layer. A sequence holds one slot from admission
    to finish; `gather` / `scatter` move the rows of a step's batch in and out.

    One row more than `num_slots`, the pad slot, takes the padding rows of a static decode
    batch (`server/decode_graph.py`): never allocated, not counted in the slot or byte totals.
    """

    def __init__(self, model: LLNForCausalLM, num_slots: int) -> None:
        if model.config.attention_kernel == "softmax":
            raise ValueError(
                "the engine serves constant-state kernels (lln, lln_diag, ea); a softmax KV "
                "cache grows with the context and does not fit a fixed slot pool"
            )
        self.num_slots = num_slots
        self.pad_slot = num_slots
        self.states: States = model.empty_states(num_slots + 1)
        self._empty: States = model.empty_states(1)
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: lowest slot first
        self._used: set[int] = set()
        self.bytes_per_slot = sum(s.nbytes for s in self._empty)

    @property
    def device(self) -> torch.device:
        return self.states[0].num_tokens.device

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_slot * self.num_slots

    @property
    def bytes_in_use(self) -> int:
        return self.bytes_per_slot * self.num_used

    def allocate(self) -> int | None:
        """A free slot holding the empty state (no tokens seen), or None if all are in use."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._used.add(slot)
        self.restore(slot, self._empty)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not in use")
        self._used.remove(slot)
        self._free.append(slot)

    def gather(self, slots: list[int]) -> States:
        """The states of `slots` as a batch: views when the slots are consecutive and in
        order (no copy), else a copy. The model writes into them only when asked to
        (`forward_states(in_place=True)`, a decode step's one slot)."""
        first = first_if_consecutive(slots)
        if first is not None:
            return [s.rows(first, len(slots)) for s in self.states]
        index = self._index(slots)
        return [s.index_select(index) for s in self.states]

    def scatter(self, slots: list[int], states: States, *, one_token: bool = False) -> None:
        """Write a batch of states back into `slots`. one_token: the states are those after
        one decode token from these slots, so parts a token cannot change are not copied."""
        if one_token:
            index = self._index(slots)
            for pool_state, new in zip(self.states, states, strict=True):
                pool_state.write_step_(index, new)
            return
        first = first_if_consecutive(slots)
        if first is not None:
            for pool_state, new in zip(self.states, states, strict=True):
                for dst, src in zip(pool_state.rows(first, len(slots)).flat(), new.flat(),
                                    strict=True):  # fmt: skip
                    dst.copy_(src)
            return
        index = self._index(slots)
        for pool_state, new in zip(self.states, states, strict=True):
            pool_state.index_copy_(index, new)

    def context_lengths(self, slots: list[int]) -> list[int]:
        """Tokens seen by each slot's state (a session's history included)."""
        if not slots:
            return []
        return self.states[0].num_tokens[self._index(slots)].tolist()

    def snapshot(self, slot: int) -> States:
        """A copy of one slot's state (batch of 1), e.g. for the prefix cache or a session."""
        return [s.rows(slot, 1).clone() for s in self.states]

    def restore(self, slot: int, snapshot: States) -> None:
        self.scatter([slot], snapshot)

    def _index(self, slots: list[int]) -> Tensor:
        return torch.tensor(slots, dtype=torch.long, device=self.device)


def first_if_consecutive(slots: list[int]) -> int | None:
    """slots[0] if the slots are consecutive and increasing (a narrow view covers them)."""
    first = slots[0]
    return first if slots == list(range(first, first + len(slots))) else None


def snapshot_bytes(snapshot: States) -> int:
    return sum(s.nbytes for s in snapshot)
