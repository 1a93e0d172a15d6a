"""Rotary positions: exact angles at any position, and the far tier's fixed distance.

A RoPE logit depends only on the distance between query and key. LLN+Diag's window keeps true
distances (< W). Keys past it (the sinks once the window has passed them, the sparse cache,
the LLN state) would sit at distances that grow with the context, past the model's trained
range (SmolLM2: 8K), where its output turns to junk (`../shared/notes/far-positions-prototype.md`).
With fixed far positions every far key is seen at one distance instead (InfLLM, LM-Infinite):
a key leaving the window is re-rotated once to position 0 (as llama.cpp's K-shift re-rotates
cached keys) and the far tier's query is the query rotated at position `distance`; the sinks
keep their positions 0..S-1 and are read by the query rotated at `sink_distance`.

Grouped far positions (Self-Extend, arXiv 2401.01325, with a ceiling) keep the order of the
sparse cache's pairs: a pair written at position n sits at floor(n / g) and the query at m reads
it at floor(m / g) + W - floor(W / g), so distances past the window grow g times slower than
the text; a pair whose grouped distance would pass `max_distance` is read at max_distance (the
query rotated there against the key at 0). Measured on the default, one distance for all 912
pairs lost the needle where grouped distances found it
(`benchmarks/results/bench_recall_grouped.md`).
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
    ) -> FarRotary:
        """For queries at positions [B, T] of a model with RoPE frequencies inv_freq; group > 0:
        the sparse cache's pairs at grouped distances up to max_distance."""
        device = positions.device

        def at(position: int) -> Tensor:  # a fill, not a host copy: a CUDA graph can hold it
            return torch.full((), position, dtype=torch.int64, device=device)

        query = rotary_cos_sin(inv_freq, at(distance), scaling, dtype)
        sink = rotary_cos_sin(inv_freq, at(sink_distance), scaling, dtype)
        leaving_cos, leaving_sin = rotary_cos_sin(inv_freq, positions - window, 1.0, dtype)
        grouped = None
        if group:
            shift = window - window // group
            query_pos = torch.div(positions, group, rounding_mode="floor") + shift
            grouped = GroupedRotary(
                *rotary_cos_sin(inv_freq, query_pos, scaling, dtype),
                *rotary_cos_sin(inv_freq, at(max_distance), scaling, dtype),
                query_pos, inv_freq.to(torch.float64), at(group), at(max_distance),
            )  # fmt: skip
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


@dataclass(frozen=True)
class GroupedRotary:
    """Grouped far positions for one forward: query_cos/query_sin [B, T, D] RoPE at each
    query's grouped position query_pos [B, T]; clamp_cos/clamp_sin [D] at max_distance; the
    RoPE frequencies (float64), the group and max_distance (0-d int64)."""

    query_cos: Tensor
    query_sin: Tensor
    clamp_cos: Tensor
    clamp_sin: Tensor
    query_pos: Tensor
    inv_freq: Tensor
    group: Tensor
    max_distance: Tensor

    def tier(self, q: Tensor) -> GroupedTier:
        return GroupedTier(
            query=rotate(q, self.query_cos[:, None], self.query_sin[:, None]),
            clamp_query=rotate(q, self.clamp_cos, self.clamp_sin),
            query_pos=self.query_pos,
            inv_freq=self.inv_freq,
            group=self.group,
            max_distance=self.max_distance,
        )


@dataclass(frozen=True)
class GroupedTier:
    """One layer's grouped far positions. query, clamp_query [B, Hq, T, D]: the queries at
    their grouped positions and at max_distance; the rest as `GroupedRotary`."""

    query: Tensor
    clamp_query: Tensor
    query_pos: Tensor
    inv_freq: Tensor
    group: Tensor
    max_distance: Tensor

    def key_positions(self, pos: Tensor) -> Tensor:
        """Grouped positions of pairs written at pos [B, N] (-1, no pair: 0)."""
        return torch.div(pos.clamp_min(0), self.group, rounding_mode="floor")

    def clamped(self, pos: Tensor) -> Tensor:
        """[B, T, N]: the pair at pos [B, N] is read at max_distance by query t."""
        distance = self.query_pos[:, :, None] - self.key_positions(pos)[:, None, :]
        return distance > self.max_distance

    def key_rotation(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [B, N, D] taking pairs' keys (at position 0) written at pos [B, N] to their
        grouped positions."""
        return rotary_cos_sin(self.inv_freq, self.key_positions(pos), 1.0, dtype)

    def step_rotation(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """For one query (T = 1): cos, sin [B, N, D] taking each key to where the query reads
        it, its grouped position or, past the ceiling, max_distance before the query's."""
        nearest = self.query_pos[:, :1] - self.max_distance
        positions = torch.maximum(self.key_positions(pos), nearest)
        return rotary_cos_sin(self.inv_freq, positions, 1.0, dtype)

    def piece(self, start: int, stop: int) -> GroupedTier:
        return replace(self, query=self.query[:, :, start:stop],
                       clamp_query=self.clamp_query[:, :, start:stop],
                       query_pos=self.query_pos[:, start:stop])  # fmt: skip


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
    min(floor(i / group) - floor(j / group) + window - floor(window / group), max_distance)."""
    pos = torch.arange(q.shape[-2], device=q.device)
    grouped = torch.div(pos, group, rounding_mode="floor")
    distance = grouped[:, None] - grouped[None, :] + window - window // group
    distance = distance.clamp_max(max_distance)
    cos, sin = rotary_cos_sin(inv_freq, -distance, scaling, q.dtype)  # [T, T, D]
    keys = rotate(k[:, :, None], cos, sin)  # [B, Hkv, T(query), T(key), D]
    return torch.einsum("bhgid,bhijd->bhgij", q, keys)
