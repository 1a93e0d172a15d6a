"""Typed per-layer recurrent states. Their size never depends on the context length.

Every state is a dataclass of tensors whose first dimension is the batch. The server's slot pool
keeps one batched state per layer and gathers / scatters rows of it by slot index.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


class BatchedState:
    """Batch-indexable container of tensors (and nested states): clone, select, scatter, bytes."""

    def _map(self, fn) -> BatchedState:
        values = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, BatchedState):
                value = value._map(fn)
            elif isinstance(value, Tensor):
                value = fn(value)
            values[f.name] = value
        return type(self)(**values)

    def _tensors(self) -> list[Tensor]:
        out = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, BatchedState):
                out.extend(value._tensors())
            elif isinstance(value, Tensor):
                out.append(value)
        return out

    @property
    def batch_size(self) -> int:
        return self._tensors()[0].shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by all tensors of the state (whole batch)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def flat(self) -> tuple[Tensor, ...]:
        """All tensors of the state, nested states in place, in field order."""
        return tuple(self._tensors())

    def unflat(self, tensors: Sequence[Tensor]):
        """A state of the same structure holding `tensors` (as returned by `flat`)."""
        rest = iter(tensors)
        return self._map(lambda _: next(rest))

    def clone(self):
        return self._map(torch.clone)

    def to(self, device: torch.device | str):
        return self._map(lambda t: t.to(device))

    def index_select(self, index: Tensor):
        """Rows `index` of the batch, as a new state (a copy)."""
        return self._map(lambda t: t.index_select(0, index))

    def rows(self, start: int, count: int):
        """Rows [start, start + count) of the batch, as views (no copy)."""
        return self._map(lambda t: t.narrow(0, start, count))

    def assign_(self, source: BatchedState) -> None:
        """Take `source`'s values, in place, where `source` is this state after an in-place
        step: tensors the step wrote in place are this state's own and are skipped, new ones
        are copied."""
        for dst, src in zip(self._tensors(), source._tensors(), strict=True):
            if src.data_ptr() != dst.data_ptr():
                dst.copy_(src)

    def index_copy_(self, index: Tensor, source: BatchedState) -> None:
        """Write the rows of `source` into rows `index` of this state, in place."""
        for dst, src in zip(self._tensors(), source._tensors(), strict=True):
            dst.index_copy_(0, index, src.to(dst.dtype))

    def write_step_(self, index: Tensor, source: BatchedState) -> None:
        """`index_copy_` for the states after one decode token (T = 1) of rows `index`: what
        a token cannot have changed is not copied (see `LLNState`)."""
        self.index_copy_(index, source)


@dataclass
class LocalKV(BatchedState):
    """Bounded K/V of the local softmax branch.

    Slots `[0, num_sinks)` hold the first tokens (attention sinks); the rest is a ring in which the
    token at position p lives in slot `num_sinks + (p - num_sinks) % ring_size`.
    k: [B, Hkv, L, D], v: [B, Hkv, L, Dv], pos: [B, L] int64 (-1 = empty slot).
    """

    k: Tensor
    v: Tensor
    pos: Tensor
    num_sinks: int = 0

    @property
    def ring_size(self) -> int:
        return self.k.shape[2] - self.num_sinks

    def slot_of(self, pos: Tensor) -> Tensor:
        """The slot that holds (or will hold) the token at position pos."""
        ring_slot = self.num_sinks + (pos - self.num_sinks) % self.ring_size
        return torch.where(pos < self.num_sinks, pos, ring_slot)

    def write_token_(self, index: Tensor, source: LocalKV, pos: Tensor) -> None:
        """Rows `index` take `source`'s rows after one token at positions pos [n]: only that
        token's slot of k and v can differ, so only it is copied (a wide window's K/V is most
        of a state's bytes)."""
        self.pos.index_copy_(0, index, source.pos)
        slot = self.slot_of(pos)
        rows = torch.arange(len(index), device=index.device)
        self.k[index, :, slot] = source.k[rows, :, slot].to(self.k.dtype)
        self.v[index, :, slot] = source.v[rows, :, slot].to(self.v.dtype)

    @classmethod
    def empty(
        cls,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        ring_size: int,
        num_sinks: int = 0,
        v_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> LocalKV:
        slots = num_sinks + ring_size
        v_dim = head_dim if v_dim is None else v_dim
        return cls(
            k=torch.zeros(batch, num_kv_heads, slots, head_dim, dtype=dtype, device=device),
            v=torch.zeros(batch, num_kv_heads, slots, v_dim, dtype=dtype, device=device),
            pos=torch.full((batch, slots), -1, dtype=torch.int64, device=device),
            num_sinks=num_sinks,
        )


@dataclass
class SparseKV(BatchedState):
    """The sparse tier of LLN+Diag: up to G exact key/value pairs that left the window.

    Which pairs stay is decided by a per-token retention score (higher stays, ties go to the
    newer token); the same positions are kept in every head. k: [B, Hkv, G, D], v: [B, Hkv, G,
    Dv], pos: [B, G] int64 (-1 = empty slot), score: [B, G] (-inf for empty slots).
    """

    k: Tensor
    v: Tensor
    pos: Tensor
    score: Tensor

    @property
    def size(self) -> int:
        return self.pos.shape[1]

    def write_step_(self, index: Tensor, source: BatchedState) -> None:
        """Rows `index` take `source`'s rows after one decode token: pairs keep their slots,
        so only the slot whose position changed (at most one per row) is copied. No host sync
        (a row with no change rewrites one slot with itself), so a CUDA graph can hold it."""
        changed = self.pos.index_select(0, index) != source.pos  # [n, G]
        has_change = changed.any(dim=1)[:, None, None]
        slot = changed.to(torch.float32).argmax(dim=1)
        rows = torch.arange(len(index), device=index.device)
        for dst, src in ((self.k, source.k), (self.v, source.v)):
            current = dst[index, :, slot]
            dst[index, :, slot] = torch.where(has_change, src[rows, :, slot].to(dst.dtype), current)
        self.pos.index_copy_(0, index, source.pos)
        self.score.index_copy_(0, index, source.score.to(self.score.dtype))

    @classmethod
    def empty(
        cls,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        size: int,
        v_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        score_dtype: torch.dtype | None = None,
    ) -> SparseKV:
        """dtype: of k and v; score_dtype: of the scores, default dtype."""
        v_dim = head_dim if v_dim is None else v_dim
        score_dtype = dtype if score_dtype is None else score_dtype
        return cls(
            k=torch.zeros(batch, num_kv_heads, size, head_dim, dtype=dtype, device=device),
            v=torch.zeros(batch, num_kv_heads, size, v_dim, dtype=dtype, device=device),
            pos=torch.full((batch, size), -1, dtype=torch.int64, device=device),
            score=torch.full((batch, size), float("-inf"), dtype=score_dtype, device=device),
        )


@dataclass
class LLNState(BatchedState):
    """State of causal LLN attention after `num_tokens` tokens (DESIGN.md section 2).

    S~ = diag(exp(-m)) sum_s exp(beta k_s) v_s^T and z~ = exp(-m) * sum_s exp(beta k_s), with m the
    per-dimension running max of beta k, so every entry is bounded and float32 holds.
    S: [B, Hkv, D, Dv], z: [B, Hkv, D], m: [B, Hkv, D] (-inf before any key), float32 or float64.
    num_tokens: [B] int64, tokens seen (including those held only by the local branch).
    local: the bounded softmax K/V of LLN+Diag variants, else None.
    sparse: the exact pairs kept beyond the window (LLN+Diag with a sparse cache), else None.
    """

    S: Tensor
    z: Tensor
    m: Tensor
    num_tokens: Tensor
    local: LocalKV | None = None
    sparse: SparseKV | None = None

    @classmethod
    def empty(
        cls,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        v_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        local: LocalKV | None = None,
        sparse: SparseKV | None = None,
    ) -> LLNState:
        v_dim = head_dim if v_dim is None else v_dim
        shape = (batch, num_kv_heads, head_dim)
        return cls(
            S=torch.zeros(*shape, v_dim, dtype=dtype, device=device),
            z=torch.zeros(shape, dtype=dtype, device=device),
            m=torch.full(shape, float("-inf"), dtype=dtype, device=device),
            num_tokens=torch.zeros(batch, dtype=torch.int64, device=device),
            local=local,
            sparse=sparse,
        )

    def write_step_(self, index: Tensor, source: BatchedState) -> None:
        if self.local is None:
            return self.index_copy_(index, source)
        for name in ("S", "z", "m", "num_tokens"):
            dst, src = getattr(self, name), getattr(source, name)
            dst.index_copy_(0, index, src.to(dst.dtype))
        self.local.write_token_(index, source.local, source.num_tokens - 1)
        if self.sparse is not None:
            self.sparse.write_step_(index, source.sparse)


@dataclass
class EAState(BatchedState):
    """State of linearized expressive attention: sums over keys of phi(k) v^T and phi(k).

    phi(k) = (k (x) k) restricted to its D(D+1)/2 distinct entries (off-diagonal ones times
    sqrt(2)), so phi(q).phi(k) = (q.k)^2 exactly.
    S: [B, Hkv, F, Dv], z: [B, Hkv, F] with F = D(D+1)/2; num_tokens: [B] int64.
    """

    S: Tensor
    z: Tensor
    num_tokens: Tensor

    @classmethod
    def empty(
        cls,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        v_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> EAState:
        v_dim = head_dim if v_dim is None else v_dim
        features = head_dim * (head_dim + 1) // 2
        return cls(
            S=torch.zeros(batch, num_kv_heads, features, v_dim, dtype=dtype, device=device),
            z=torch.zeros(batch, num_kv_heads, features, dtype=dtype, device=device),
            num_tokens=torch.zeros(batch, dtype=torch.int64, device=device),
        )


def kv_cache_bytes(
    num_tokens: int, num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_elem: int = 2
) -> int:
    """Bytes a softmax model's KV cache holds for one sequence of `num_tokens` tokens."""
    return 2 * num_tokens * num_layers * num_kv_heads * head_dim * bytes_per_elem


@dataclass
class KVState(BatchedState):
    """KV cache of the softmax baseline; it grows with the context (that is the point of LLN).

    k: [B, Hkv, L, D], v: [B, Hkv, L, Dv]; row b's first num_tokens[b] slots are its tokens.
    """

    k: Tensor
    v: Tensor
    num_tokens: Tensor

    @classmethod
    def empty(
        cls,
        batch: int,
        num_kv_heads: int,
        head_dim: int,
        v_dim: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> KVState:
        v_dim = head_dim if v_dim is None else v_dim
        return cls(
            k=torch.zeros(batch, num_kv_heads, 0, head_dim, dtype=dtype, device=device),
            v=torch.zeros(batch, num_kv_heads, 0, v_dim, dtype=dtype, device=device),
            num_tokens=torch.zeros(batch, dtype=torch.int64, device=device),
        )
