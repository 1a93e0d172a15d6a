"""Rotary positions: exact angles at any position, and the far tier's fixed distance.

A RoPE logit depends only on the distance between query and key. LLN+Diag's window keeps true
distances (< W). Keys past it (the sinks once the window has passed them, the sparse cache,
the LLN state) would sit at distances that grow with the context, past the model's trained
range (SmolLM2: 8K), where its output turns to junk (`../shared/notes/far-positions-prototype.md`).
With fixed far positions every far key is seen at one distance instead (InfLLM, LM-Infinite):
a key leaving the window is re-rotated once to position 0 (as llama.cpp's K-shift re-rotates
cached keys) and the far tier's query is the query rotated at position `distance`; the sinks
keep their positions 0..S-1 and are read by the query rotated at `sink_distance`.

Grouped far positions (Self-Extend, arXiv 2401.01325) keep the order of the sparse cache's
pairs: a pair written at position n sits at floor(n / g) and the query at m reads it at
floor(m / g) + W - floor(W / g), so distances past the window grow g times slower than the
text. The group doubles (g = far_group * 2^k, the smallest k) as the context grows, so that no
pair is ever read past `max_distance`, the trained range: at any length the pairs keep their
order, at a resolution that halves each time the context doubles. Measured on the default,
one distance for all 912 pairs lost the needle where grouped distances found it
(`benchmarks/results/bench_recall_grouped.md`); a ceiling that reads every pair past it at one
distance instead of doubling found 4/10 against 5/10 (a reach of 1024 at 8K,
`bench_recall_rev11.md`).
The LLN state and the sinks keep the fixed distance: a sum of keys has no order to keep.

This file is where far keys and queries get their positions; the kernels take a `FarTier`
and apply it where keys leave the window and where the far tier is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace

import torch
from torch import Tensor

FAR_POSITIONS = ("original", "fixed", "grouped")


def rotary_cos_sin(
    inv_freq: Tensor, positions: Tensor, scaling: float = 1.0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos and sin [..., D] of RoPE at integer positions [...] (frequencies inv_freq [D/2]).

    The angles p * f are formed in float64: in float32, p * f at p = 10^6 is off by ~0.06 rad
    in the fastest dimension, so window logits would drift with the absolute position. Here
    they are exact to ~1e-9 rad at p = 10^7, and cos/sin are rounded once to `dtype`."""
    angles = positions.to(torch.float64)[..., None] * inv_freq.to(torch.float64)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * scaling).to(dtype), (angles.sin() * scaling).to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [..., D] rotated by RoPE's (cos, sin), broadcast against x (transformers' layout:
    dimension i pairs with i + D/2)."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated_half * sin.to(x.dtype)


@dataclass(frozen=True)
class FarRotary:
    """The far tier's rotations for one forward, shared by every layer.

    query_cos/query_sin [D]: RoPE at the far query's position (`distance`, with the model's
    attention scaling); sink_cos/sink_sin [D]: the same at `sink_distance`; leaving_cos/
    leaving_sin [B, T, D]: the pure rotation that takes the key leaving the window at each of
    the T queries (position p - W) back to position 0.
    """

    query_cos: Tensor
    query_sin: Tensor
    sink_cos: Tensor
    sink_sin: Tensor
    leaving_cos: Tensor
    leaving_sin: Tensor
    grouped: GroupedRotary | None = None

    @classmethod
    def make(
        cls,
        inv_freq: Tensor,
        positions: Tensor,
        *,
        window: int,
        distance: int,
        sink_distance: int,
        scaling: float = 1.0,
        dtype: torch.dtype = torch.float32,
        group: int = 0,
        max_distance: int = 0,
        table: tuple[Tensor, Tensor] | None = None,
    ) -> FarRotary:
        """For queries at positions [B, T] of a model with RoPE frequencies inv_freq; group > 0:
        the sparse cache's pairs at grouped distances (`group_at`) within max_distance, their
        keys' rotations read from `table` (`rotation_table` of max_distance + 1 positions,
        made here if not given: a model makes it once)."""
        device = positions.device

        def at(position: int) -> Tensor:  # a fill, not a host copy: a CUDA graph can hold it
            return torch.full((), position, dtype=torch.int64, device=device)

        query = rotary_cos_sin(inv_freq, at(distance), scaling, dtype)
        sink = rotary_cos_sin(inv_freq, at(sink_distance), scaling, dtype)
        leaving_cos, leaving_sin = rotary_cos_sin(inv_freq, positions - window, 1.0, dtype)
        grouped = None
        if group:
            if max_distance < window:
                raise ValueError(f"max_distance {max_distance} is inside the window ({window})")
            groups = group_at(positions, group, window, max_distance)
            query_pos = torch.div(positions, groups, rounding_mode="floor") + window
            query_pos = query_pos - torch.div(window, groups, rounding_mode="floor")
            if table is None:
                table = rotation_table(inv_freq, max_distance + 1, dtype)
            grouped = GroupedRotary(
                *rotary_cos_sin(inv_freq, query_pos, scaling, dtype), query_pos, *table, groups
            )
        return cls(*query, *sink, leaving_cos, -leaving_sin, grouped)

    def flat(self) -> tuple[Tensor, ...]:
        """The tensors in order (`FarRotary.unflat` rebuilds it)."""
        grouped = (
            ()
            if self.grouped is None
            else tuple(getattr(self.grouped, f.name) for f in dataclasses.fields(self.grouped))
        )
        return (self.query_cos, self.query_sin, self.sink_cos, self.sink_sin, self.leaving_cos,
                self.leaving_sin, *grouped)  # fmt: skip

    @classmethod
    def unflat(cls, flat: tuple[Tensor, ...]) -> FarRotary:
        grouped = GroupedRotary(*flat[6:]) if len(flat) > 6 else None
        return cls(*flat[:6], grouped)

    def tier(self, q: Tensor) -> FarTier:
        """One layer's far tier for its queries before RoPE, q [B, Hq, T, D]."""
        return FarTier(
            query=rotate(q, self.query_cos, self.query_sin),
            sink_query=rotate(q, self.sink_cos, self.sink_sin),
            leaving_cos=self.leaving_cos,
            leaving_sin=self.leaving_sin,
            grouped=None if self.grouped is None else self.grouped.tier(q),
        )


def group_at(positions: Tensor, group: int, window: int, max_distance: int) -> Tensor:
    """[B, T] the group of queries at positions [B, T]: group * 2^k for the smallest k that
    reads a pair written at position 0 (the farthest) within max_distance, i.e.
    floor(m / g) + W - floor(W / g) <= max_distance (max_distance >= W: some k does)."""
    doublings = torch.arange(MAX_DOUBLINGS, device=positions.device)
    groups = group * torch.pow(2, doublings)  # [K]
    m = positions[..., None]
    farthest = torch.div(m, groups, rounding_mode="floor") + window
    farthest = farthest - torch.div(window, groups, rounding_mode="floor")
    k = (farthest > max_distance).sum(dim=-1, keepdim=True)  # the test is monotone in k
    return groups.expand(*positions.shape, -1).gather(-1, k)[..., 0]


MAX_DOUBLINGS = 48  # enough for any position below 2^47


def rotation_table(inv_freq: Tensor, size: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [size, D] of RoPE at positions 0..size-1 (no attention scaling): grouped key
    positions never pass max_distance, so a decode step gathers its pairs' rotations from
    this table instead of forming ~58K angles in float64 per layer group (which doubled the
    default's decode step, 16 -> 37 ms)."""
    positions = torch.arange(size, device=inv_freq.device)
    return rotary_cos_sin(inv_freq, positions, 1.0, dtype)


@dataclass(frozen=True)
class GroupedRotary:
    """Grouped far positions for one forward: query_cos/query_sin [B, T, D] RoPE at each
    query's grouped position query_pos [B, T]; the keys' rotations at every grouped position
    (`rotation_table`) and each query's group [B, T] (`group_at`)."""

    query_cos: Tensor
    query_sin: Tensor
    query_pos: Tensor
    table_cos: Tensor
    table_sin: Tensor
    group: Tensor

    def tier(self, q: Tensor) -> GroupedTier:
        return GroupedTier(
            query=rotate(q, self.query_cos[:, None], self.query_sin[:, None]),
            query_pos=self.query_pos,
            table_cos=self.table_cos,
            table_sin=self.table_sin,
            group=self.group,
        )


@dataclass(frozen=True)
class GroupedTier:
    """One layer's grouped far positions. query [B, Hq, T, D]: the queries at their grouped
    positions; the rest as `GroupedRotary`."""

    query: Tensor
    query_pos: Tensor
    table_cos: Tensor
    table_sin: Tensor
    group: Tensor

    def key_rotation(self, pos: Tensor, group: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [B, N, D] taking pairs' keys (at position 0) written at pos [B, N] (-1, no
        pair) to their grouped positions for queries of `group`."""
        return self._at(torch.div(pos.clamp_min(0), group, rounding_mode="floor"), dtype)

    def step_rotation(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """For one query (T = 1): cos, sin [B, N, D] taking each key to its grouped position
        for the row's query."""
        positions = torch.div(pos.clamp_min(0), self.group[:, :1], rounding_mode="floor")
        return self._at(positions, dtype)

    def _at(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # a pair's grouped position is below its query's, within max_distance: in the table
        # (the clamp only keeps a wrong index from reading outside it)
        positions = positions.clamp_max(self.table_cos.shape[0] - 1)
        return self.table_cos[positions].to(dtype), self.table_sin[positions].to(dtype)

    def piece(self, start: int, stop: int) -> GroupedTier:
        return replace(self, query=self.query[:, :, start:stop],
                       query_pos=self.query_pos[:, start:stop],
                       group=self.group[:, start:stop])  # fmt: skip


@dataclass(frozen=True)
class FarTier:
    """What one layer's far tier reads in place of the rotated queries and keys.

    query [B, Hq, T, D]: the query for the sparse cache and the LLN state; sink_query: for the
    sinks past the window; leaving_cos/leaving_sin [B, T, D]: the rotation of the key leaving
    the window at each query to position 0 (`enter`); grouped: the sparse cache's grouped
    positions (in place of `query` for it), if any.
    """

    query: Tensor
    sink_query: Tensor
    leaving_cos: Tensor
    leaving_sin: Tensor
    grouped: GroupedTier | None = None

    def enter(self, k: Tensor) -> Tensor:
        """Keys [B, Hkv, T, D] leaving the window at the T queries, at position 0."""
        return rotate(k, self.leaving_cos[:, None], self.leaving_sin[:, None])

    def piece(self, start: int, stop: int) -> FarTier:
        """The tier of queries start..stop-1."""
        return FarTier(
            self.query[:, :, start:stop],
            self.sink_query[:, :, start:stop],
            self.leaving_cos[:, start:stop],
            self.leaving_sin[:, start:stop],
            None if self.grouped is None else self.grouped.piece(start, stop),
        )


def naive_grouped_logits(
    q: Tensor,
    k: Tensor,
    inv_freq: Tensor,
    *,
    window: int,
    group: int,
    max_distance: int,
    scaling: float = 1.0,
) -> Tensor:
    """Reference: every query-key logit of the sparse cache at grouped far positions, from the
    distances themselves. q [B, Hkv, G, T, D] before RoPE (grouped per KV head), k [B, Hkv, T, D]
    at position 0 -> [B, Hkv, G, T, T], query i against key j at distance
    floor(i / g) - floor(j / g) + window - floor(window / g), g = `group_at` of i."""
    seq_len = q.shape[-2]
    distance = torch.empty(seq_len, seq_len, dtype=torch.int64)
    for i in range(seq_len):
        g = group
        while i // g + window - window // g > max_distance:
            g *= 2
        for j in range(seq_len):
            distance[i, j] = i // g - j // g + window - window // g
    cos, sin = rotary_cos_sin(inv_freq, -distance.to(q.device), scaling, q.dtype)  # [T, T, D]
    keys = rotate(k[:, :, None], cos, sin)  # [B, Hkv, T(query), T(key), D]
    return torch.einsum("bhgid,bhijd->bhgij", q, keys)
