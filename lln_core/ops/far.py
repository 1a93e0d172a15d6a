"""Rotary positions: exact angles at any position, and the far tier's fixed distance.

A RoPE logit depends only on the distance between query and key. LLN+Diag's window keeps true
distances (< W). Keys past it (the sinks once the window has passed them, the sparse cache,
the LLN state) would sit at distances that grow with the context, past the model's trained
range (SmolLM2: 8K), where its output turns to junk (`../shared/notes/far-positions-prototype.md`).
With fixed far positions every far key is seen at one distance instead (InfLLM, LM-Infinite):
a key leaving the window is re-rotated once to position 0 (as llama.cpp's K-shift re-rotates
cached keys) and the far tier's query is the query rotated at position `distance`; the sinks
keep their positions 0..S-1 and are read by the query rotated at `sink_distance`.

This file is where far keys and queries get their positions; the kernels take a `FarTier`
and apply it where keys leave the window and where the far tier is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FAR_POSITIONS = ("original", "fixed")


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
    ) -> FarRotary:
        """For queries at positions [B, T] of a model with RoPE frequencies inv_freq."""
        device = positions.device

        def at(position: int) -> Tensor:  # a fill, not a host copy: a CUDA graph can hold it
            return torch.full((), position, dtype=torch.int64, device=device)

        query = rotary_cos_sin(inv_freq, at(distance), scaling, dtype)
        sink = rotary_cos_sin(inv_freq, at(sink_distance), scaling, dtype)
        leaving_cos, leaving_sin = rotary_cos_sin(inv_freq, positions - window, 1.0, dtype)
        return cls(*query, *sink, leaving_cos, -leaving_sin)

    def flat(self) -> tuple[Tensor, ...]:
        return (self.query_cos, self.query_sin, self.sink_cos, self.sink_sin, self.leaving_cos,
                self.leaving_sin)  # fmt: skip

    def tier(self, q: Tensor) -> FarTier:
        """One layer's far tier for its queries before RoPE, q [B, Hq, T, D]."""
        return FarTier(
            query=rotate(q, self.query_cos, self.query_sin),
            sink_query=rotate(q, self.sink_cos, self.sink_sin),
            leaving_cos=self.leaving_cos,
            leaving_sin=self.leaving_sin,
        )


@dataclass(frozen=True)
class FarTier:
    """What one layer's far tier reads in place of the rotated queries and keys.

    query [B, Hq, T, D]: the query for the sparse cache and the LLN state; sink_query: for the
    sinks past the window; leaving_cos/leaving_sin [B, T, D]: the rotation of the key leaving
    the window at each query to position 0 (`enter`).
    """

    query: Tensor
    sink_query: Tensor
    leaving_cos: Tensor
    leaving_sin: Tensor

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
        )
