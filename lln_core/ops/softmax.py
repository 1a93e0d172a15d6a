"""Softmax attention: the causal GQA reference (baseline and teacher) and the bounded local branch.

The local branch is softmax over a bounded set of keys held in a `LocalKV`: the first
`num_sinks` tokens (attention sinks, StreamingLLM) plus either the last `size` tokens (sliding
window) or the tokens of the current block of `size` (the LLN paper's block-diagonal form).
Visibility is decided from absolute positions, so sequences of a batch may be at different
lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lln_core.ops.common import (
    check_qkv,
    compute_dtype,
    count_tokens,
    group_queries,
    ungroup,
    valid_tokens,
)
from lln_core.state import KVState, LocalKV


def softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, causal: bool = True
) -> Tensor:
    """softmax(q k^T * scale) v with GQA. q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D(v)].

    With Tk > Tq (a KV cache), query i sits at position Tk - Tq + i. Returns [B, Hq, Tq, Dv].
    """
    num_kv_heads = k.shape[1]
    if q.shape[1] % num_kv_heads or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible q {tuple(q.shape)} and k {tuple(k.shape)}")
    dtype = compute_dtype(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qg = group_queries(q, num_kv_heads, dtype)
    logits = torch.einsum("bhgtd,bhsd->bhgts", qg, k.to(dtype)) * scale
    if causal:
        q_len, k_len = q.shape[2], k.shape[2]
        pos_q = torch.arange(k_len - q_len, k_len, device=q.device)
        visible = torch.arange(k_len, device=q.device)[None] <= pos_q[:, None]
        logits = logits.masked_fill(~visible, float("-inf"))
    y = torch.softmax(logits, dim=-1) @ v.to(dtype)[:, :, None]
    return ungroup(y).to(q.dtype)


@dataclass(frozen=True)
class LocalSpec:
    """Which keys the local softmax branch sees besides the query's own.

    kind: "window" (the last `size` tokens, the query included) or "block" (tokens of the
    query's block of `size`); num_sinks: the first tokens, always visible.
    """

    kind: Literal["window", "block"] = "window"
    size: int = 64
    num_sinks: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("window", "block"):
            raise ValueError(f"local kind must be 'window' or 'block', got {self.kind!r}")
        if self.size < 1 or self.num_sinks < 0:
            raise ValueError(
                f"need size >= 1 and num_sinks >= 0, got {self.size}, {self.num_sinks}"
            )

    def visible(self, pos_q: Tensor, pos_k: Tensor) -> Tensor:
        """pos_q [..., Tq, 1], pos_k [..., 1, Tk] (absolute, -1 = empty) -> bool mask."""
        if self.kind == "window":
            near = pos_k > pos_q - self.size
        else:
            near = torch.div(pos_k, self.size, rounding_mode="floor") == torch.div(
                pos_q, self.size, rounding_mode="floor"
            )
        return (pos_k >= 0) & (pos_k <= pos_q) & (near | (pos_k < self.num_sinks))

    def empty_cache(self, batch: int, num_kv_heads: int, head_dim: int, **kwargs) -> LocalKV:
        return LocalKV.empty(batch, num_kv_heads, head_dim, self.size, self.num_sinks, **kwargs)


def local_softmax_parts(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache: LocalKV,
    num_tokens: Tensor,
    spec: LocalSpec,
    *,
    scale: float,
    valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, LocalKV]:
    """Unnormalised local softmax over T new tokens, then the cache after them.

    q: [B, Hkv, G, T, D] (grouped), k: [B, Hkv, T, D], v: [B, Hkv, T, Dv]; num_tokens [B] gives
    each sequence's position of its first new token; valid [B, T] (optional) marks right padding,
    whose keys are neither seen nor stored. Returns num [B, Hkv, G, T, Dv], den and
    log_scale [B, Hkv, G, T] (true sums are exp(log_scale) * num, den) and the new cache.

    No loop over the sequence: queries go in blocks of W = ring_size, each against a band of
    2W keys (the previous block and its own, the cached tail in front of the first), plus the
    sink keys. Work per token is O((W + num_sinks) D).
    """
    batch, num_kv, group, seq_len, dim = q.shape
    ring, sinks = cache.ring_size, cache.num_sinks
    pos_q = num_tokens[:, None] + torch.arange(seq_len, device=q.device)  # [B, T]
    pos_new = pos_q if valid is None else torch.where(valid, pos_q, -1)
    new_cache = write_local(cache, k, v, pos_new)

    num_blocks = -(-seq_len // ring)
    pad = num_blocks * ring - seq_len
    tail_k, tail_v, tail_valid = read_window_tail(cache, num_tokens)  # positions n-W .. n-1
    band_pos = torch.cat([torch.where(tail_valid, pos_q[:, :1] - ring + _arange(ring, q), -1),
                          torch.where(pos_new >= sinks, pos_new, -1)], dim=1)  # fmt: skip
    band_pos = F.pad(band_pos, (0, pad), value=-1)
    band_k = _bands(F.pad(torch.cat([tail_k.to(k.dtype), k], dim=2), (0, 0, 0, pad)), ring)
    band_v = _bands(F.pad(torch.cat([tail_v.to(v.dtype), v], dim=2), (0, 0, 0, pad)), ring)
    band_pos = band_pos.unfold(1, 2 * ring, ring)  # [B, N, 2W]
    qb = F.pad(q, (0, 0, 0, pad)).reshape(batch, num_kv, group, num_blocks, ring, dim)
    pos_qb = F.pad(pos_q, (0, pad)).reshape(batch, num_blocks, ring)

    band_mask = (
        spec.visible(pos_qb[..., None], band_pos[:, :, None, :]) & (band_pos >= 0)[:, :, None]
    )  # [B, N, W, 2W]
    band_logits = torch.einsum("bhgncd,bhnsd->bhgncs", qb, band_k) * scale
    band_logits = band_logits.masked_fill(~band_mask[:, None, None], float("-inf"))
    band_logits = band_logits.flatten(3, 4)[:, :, :, :seq_len]  # [B, H, G, T, 2W]

    sink_pos = new_cache.pos[:, :sinks]
    sink_mask = (sink_pos[:, None, :] >= 0) & (sink_pos[:, None, :] <= pos_q[:, :, None])
    sink_logits = q @ new_cache.k[:, :, :sinks].to(q.dtype).transpose(-1, -2)[:, :, None] * scale
    sink_logits = sink_logits.masked_fill(~sink_mask[:, None, None], float("-inf"))

    logits = torch.cat([band_logits, sink_logits], dim=-1)
    log_scale = logits.amax(-1)  # [B, H, G, T]
    weights = torch.exp(logits - log_scale[..., None])
    band_w, sink_w = weights[..., : 2 * ring], weights[..., 2 * ring :]
    band_w = F.pad(band_w, (0, 0, 0, pad)).reshape(batch, num_kv, group, num_blocks, ring, -1)
    num = torch.einsum("bhgncs,bhnse->bhgnce", band_w, band_v).flatten(3, 4)[:, :, :, :seq_len]
    num = num + sink_w @ new_cache.v[:, :, :sinks].to(v.dtype)[:, :, None]
    den = band_w.sum(-1).flatten(3, 4)[:, :, :, :seq_len] + sink_w.sum(-1)
    return num, den, log_scale, new_cache


def _arange(count: int, like: Tensor) -> Tensor:
    return torch.arange(count, device=like.device)


def _bands(x: Tensor, ring: int) -> Tensor:
    """[B, H, W + N W, D] -> [B, H, N, 2W, D]: block j's keys are positions jW .. jW + 2W - 1."""
    return x.unfold(2, 2 * ring, ring).transpose(-1, -2)


def write_local(cache: LocalKV, k: Tensor, v: Tensor, pos: Tensor) -> LocalKV:
    """Store new keys/values (positions pos [B, C], increasing, -1 = padding) in their slots.

    Sink positions go to slots [0, num_sinks); of the others only the last ring_size can still
    be needed, each in slot num_sinks + (p - num_sinks) % ring_size. The rest (and padding) go
    to a scratch slot that is dropped, so no two writes target one slot. Returns a new cache.
    """
    sinks, ring = cache.num_sinks, cache.ring_size
    is_recent = pos > pos.amax(dim=1, keepdim=True) - ring
    slot = torch.where(pos < sinks, pos, sinks + (pos - sinks) % ring)
    scratch = sinks + ring
    keep = (pos >= 0) & ((pos < sinks) | is_recent)
    slot = torch.where(keep, slot, torch.full_like(slot, scratch))

    def scatter(buffer: Tensor, new: Tensor) -> Tensor:
        padded = torch.cat([buffer, buffer[:, :, :1]], dim=2)
        index = slot[:, None, :, None].expand(-1, new.shape[1], -1, new.shape[-1])
        return padded.scatter(2, index, new.to(buffer.dtype))[:, :, :scratch]

    pos_buffer = torch.cat([cache.pos, cache.pos[:, :1]], dim=1).scatter(1, slot, pos)
    return LocalKV(
        k=scatter(cache.k, k), v=scatter(cache.v, v), pos=pos_buffer[:, :scratch], num_sinks=sinks
    )


def _slot_index(slot: Tensor, buffer: Tensor) -> Tensor:
    """Gather index of one slot per row of a [B, H, L, D] buffer."""
    return slot[:, None, None, None].expand(-1, buffer.shape[1], 1, buffer.shape[-1])


def read_window_tail(cache: LocalKV, num_tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keys/values at positions [n - ring_size, n) in position order, and which of them exist.

    These are the keys that leave a sliding window of ring_size tokens as the next ones arrive.
    Returns k [B, Hkv, W, D], v [B, Hkv, W, Dv], valid [B, W] (False for sinks and p < 0).
    """
    sinks, ring = cache.num_sinks, cache.ring_size
    pos = num_tokens[:, None] - ring + torch.arange(ring, device=num_tokens.device)  # [B, W]
    slot = sinks + (pos - sinks) % ring
    valid = (pos >= sinks) & (cache.pos.gather(1, slot) == pos)

    def gather(buffer: Tensor) -> Tensor:
        index = slot[:, None, :, None].expand(-1, buffer.shape[1], -1, buffer.shape[-1])
        return buffer.gather(2, index)

    return gather(cache.k), gather(cache.v), valid


def softmax_kv_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache: KVState,
    *,
    scale: float | None = None,
    lengths: Tensor | None = None,
) -> tuple[Tensor, KVState]:
    """Causal softmax over the cached tokens and T new ones; returns y and the grown cache.

    q: [B, Hq, T, D]; k, v: [B, Hkv, T, D(v)]; rows may sit at different lengths
    (cache.num_tokens) and carry right padding (lengths). y: [B, Hq, T, Dv].
    """
    batch, num_kv_heads, _group, seq_len = check_qkv(q, k, v)
    valid = valid_tokens(lengths, batch, seq_len, q.device)
    n = cache.num_tokens
    if valid is None and bool((n == n[0]).all()):
        return _softmax_kv_uniform(q, k, v, cache, scale)
    dtype = compute_dtype(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qg = group_queries(q, num_kv_heads, dtype)
    new = torch.arange(seq_len, device=q.device)
    pos_q = n[:, None] + new  # [B, T]
    old = torch.arange(cache.k.shape[2], device=q.device)
    pos_old = torch.where(old[None] < n[:, None], old[None], -1)
    pos_new = pos_q if valid is None else torch.where(valid, pos_q, -1)
    pos_k = torch.cat([pos_old, pos_new], dim=1)
    mask = (pos_k[:, None, :] >= 0) & (pos_k[:, None, :] <= pos_q[:, :, None])
    keys = torch.cat([cache.k.to(dtype), k.to(dtype)], dim=2)
    values = torch.cat([cache.v.to(dtype), v.to(dtype)], dim=2)
    logits = torch.einsum("bhgtd,bhsd->bhgts", qg, keys) * scale
    logits = logits.masked_fill(~mask[:, None, None], float("-inf"))
    y = torch.softmax(logits, dim=-1) @ values[:, :, None]
    return ungroup(y).to(q.dtype), _append(cache, k, v, count_tokens(valid, seq_len))


def _softmax_kv_uniform(
    q: Tensor, k: Tensor, v: Tensor, cache: KVState, scale: float | None
) -> tuple[Tensor, KVState]:
    """All rows at the same length, no padding: a contiguous cache and SDPA."""
    past = int(cache.num_tokens[0])
    keys = torch.cat([cache.k[:, :, :past], k.to(cache.k.dtype)], dim=2)
    values = torch.cat([cache.v[:, :, :past], v.to(cache.v.dtype)], dim=2)
    seq_len = q.shape[2]
    mask = None
    if past and seq_len > 1:
        pos = torch.arange(past + seq_len, device=q.device)
        mask = pos[None] <= pos[past:, None]
    y = F.scaled_dot_product_attention(
        q.to(keys.dtype),
        keys,
        values,
        attn_mask=mask,
        is_causal=not past and seq_len > 1,
        scale=scale,
        enable_gqa=True,
    )
    grown = KVState(keys, values, cache.num_tokens + seq_len)
    return y.to(q.dtype), grown


def _append(cache: KVState, k: Tensor, v: Tensor, added: Tensor | int) -> KVState:
    """Write each row's new tokens after its own cached ones, growing the buffer as needed."""
    n = cache.num_tokens
    total = n + added
    capacity = max(int(total.max()), cache.k.shape[2])
    grow = capacity - cache.k.shape[2]
    keys = F.pad(cache.k, (0, 0, 0, grow))
    values = F.pad(cache.v, (0, 0, 0, grow))
    seq_len = k.shape[2]
    slot = n[:, None] + torch.arange(seq_len, device=k.device)  # [B, T]
    keep = slot < total[:, None]
    scratch = capacity
    slot = torch.where(keep, slot, scratch)

    def scatter(buffer: Tensor, new: Tensor) -> Tensor:
        padded = F.pad(buffer, (0, 0, 0, 1))
        index = slot[:, None, :, None].expand(-1, new.shape[1], -1, new.shape[-1])
        return padded.scatter(2, index, new.to(buffer.dtype))[:, :, :capacity]

    return KVState(scatter(keys, k), scatter(values, v), total)


def local_softmax_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cache: LocalKV,
    num_tokens: Tensor,
    spec: LocalSpec,
    *,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor, LocalKV, tuple[Tensor, Tensor, Tensor]]:
    """Decode: one new token per row (q [B, Hkv, G, 1, D], k, v [B, Hkv, 1, D]).

    The token takes its slot in a copy of the cache, then attends over the slots. Also returns
    what its slot held before: (k, v [B, Hkv, 1, D], valid [B, 1]) where valid means "the token
    at position n - ring_size, not a sink", i.e. the key that just left a sliding window.
    """
    sinks, ring = cache.num_sinks, cache.ring_size
    slot = torch.where(num_tokens < sinks, num_tokens, sinks + (num_tokens - sinks) % ring)
    # one-hot writes and gathers: much cheaper than advanced indexing for these tiny tensors
    is_slot = torch.arange(cache.pos.shape[1], device=slot.device)[None] == slot[:, None]  # [B, L]
    evicted_k = cache.k.gather(2, _slot_index(slot, cache.k))
    evicted_v = cache.v.gather(2, _slot_index(slot, cache.v))
    left = num_tokens - ring
    evicted_valid = (cache.pos.gather(1, slot[:, None]) == left[:, None]) & (left >= sinks)[:, None]
    write = is_slot[:, None, :, None]
    new = LocalKV(
        torch.where(write, k.to(cache.k.dtype), cache.k),
        torch.where(write, v.to(cache.v.dtype), cache.v),
        torch.where(is_slot, num_tokens[:, None], cache.pos),
        sinks,
    )
    if spec.kind == "window":
        # after the write the ring holds exactly the window (n - W, n]; sinks are always seen
        mask = new.pos >= 0
    else:
        mask = spec.visible(num_tokens[:, None], new.pos)  # [B, L]
    batch, num_kv, group, _, dim = q.shape
    logits = q.reshape(batch, num_kv, group, dim) @ new.k.to(q.dtype).transpose(-1, -2) * scale
    logits = logits.masked_fill(~mask[:, None, None], float("-inf"))  # [B, Hkv, G, L]
    log_scale = logits.amax(dim=-1, keepdim=True)
    weights = torch.exp(logits - log_scale)
    num = (weights @ new.v.to(q.dtype))[:, :, :, None]  # [B, Hkv, G, 1, Dv]
    return num, weights.sum(-1, keepdim=True), log_scale, new, (evicted_k, evicted_v, evicted_valid)
