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
    exp_ftz,
    finite_or_zero,
    fused_softmax_fits,
    fused_softmax_parts,
    group_queries,
    ungroup,
    valid_tokens,
)
from lln_core.ops.slot_softmax import Parts, one_slot, slot_softmax
from lln_core.state import KVState, LocalKV

# Queries per block of the local branch's prefill. Each block scores W + C keys, so a block as
# wide as a wide window (C = W) doubles the work per query; small blocks trade that for more,
# smaller matrix products.
QUERY_BLOCK = 64


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
    query's block of `size`); num_sinks: the first tokens, always visible, unless far_sinks:
    then a sink is part of the local branch only while it is near, and past that it belongs to
    the far tier (`far_sink_visible`), which reads it at its own rotary distance.
    """

    kind: Literal["window", "block"] = "window"
    size: int = 64
    num_sinks: int = 0
    far_sinks: bool = False

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
        sink = pos_k < (0 if self.far_sinks else self.num_sinks)
        return (pos_k >= 0) & (pos_k <= pos_q) & (near | sink)

    def far_sink_visible(self, pos_q: Tensor, pos_k: Tensor) -> Tensor:
        """The sinks the local branch leaves to the far tier (as `visible`; none unless
        far_sinks)."""
        sink = (pos_k >= 0) & (pos_k < self.num_sinks) & (pos_k <= pos_q)
        return sink & ~self.visible(pos_q, pos_k)

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
    tail: tuple[Tensor, Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, LocalKV]:
    """Unnormalised local softmax over T new tokens, then the cache after them.

    q: [B, Hkv, G, T, D] (grouped), k: [B, Hkv, T, D], v: [B, Hkv, T, Dv]; num_tokens [B] gives
    each sequence's position of its first new token; valid [B, T] (optional) marks right padding,
    whose keys are neither seen nor stored; tail: `read_window_tail(cache, num_tokens)` if the
    caller already has it. Returns num [B, Hkv, G, T, Dv], den and
    log_scale [B, Hkv, G, T] (true sums are exp(log_scale) * num, den) and the new cache.

    No loop over the sequence: queries go in blocks of C = min(W, QUERY_BLOCK) (the G query
    heads of a KV head stacked in one block), each against its keys: a band of W + C (the W
    keys before the block and its own, the cached tail in front of the first) plus the sinks.
    Work per token O((W + C + S) D).
    """
    batch, num_kv, group, seq_len, _ = q.shape
    ring, sinks = cache.ring_size, cache.num_sinks
    pos_q = num_tokens[:, None] + torch.arange(seq_len, device=q.device)  # [B, T]
    pos_new = pos_q if valid is None else torch.where(valid, pos_q, -1)
    new_cache = _write_new(cache, k, v, pos_new, valid is None)

    block = min(ring, QUERY_BLOCK)
    num_blocks = -(-seq_len // block)
    pad = num_blocks * block - seq_len
    tail_k, tail_v, tail_valid = tail or read_window_tail(cache, num_tokens)  # n-W .. n-1
    band_pos = torch.cat([torch.where(tail_valid, pos_q[:, :1] - ring + _arange(ring, q), -1),
                          torch.where(pos_new >= sinks, pos_new, -1)], dim=1)  # fmt: skip
    band_pos = F.pad(band_pos, (0, pad), value=-1).unfold(1, ring + block, block)  # [B,N,W+C]
    sink_pos = new_cache.pos[:, None, :sinks].expand(-1, num_blocks, -1)
    key_pos = torch.cat([band_pos, sink_pos], dim=-1)  # [B, N, L], L = W + C + S
    pos_qb = F.pad(pos_q, (0, pad)).reshape(batch, num_blocks, 1, block, 1)
    bias = _log_mask(spec.visible(pos_qb, key_pos[:, :, None, None]), q.dtype)  # [B,N,1,C,L]

    keys = _block_keys(tail_k, k, new_cache.k[:, :, :sinks], block, pad)  # [B, Hkv, N, L, D]
    values = _block_keys(tail_v, v, new_cache.v[:, :, :sinks], block, pad)
    if fused_softmax_fits(q, keys, values):
        return (*_fused_blocks(q * scale, keys, values, bias, block, pad), new_cache)
    qb = _to_blocks(q * scale, block, pad)  # [B, Hkv, N, G C, D]
    logits = qb @ keys.transpose(-1, -2)  # [B, Hkv, N, G C, L]
    inplace = not logits.requires_grad
    blocks = logits.view(batch, num_kv, num_blocks, group, block, -1)
    blocks = blocks.add_(bias[:, None]) if inplace else blocks + bias[:, None]
    logits = blocks.view_as(logits)
    log_scale = finite_or_zero(logits.amax(-1, keepdim=True))  # rows with no key: 0
    logits = logits.sub_(log_scale) if inplace else logits - log_scale
    weights = exp_ftz(logits, inplace=inplace)
    num = _from_blocks(weights @ values, group, seq_len)
    den = _from_blocks(weights.sum(-1, keepdim=True), group, seq_len)[..., 0]
    return num, den, _from_blocks(log_scale, group, seq_len)[..., 0], new_cache


def _fused_blocks(
    q: Tensor, keys: Tensor, values: Tensor, bias: Tensor, block: int, pad: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The blocks' softmax parts in one fused kernel, each block of C queries as one batch
    entry: q [B, Hkv, G, T, D] (scaled), keys/values [B, Hkv, N, L, D], bias [B, N, 1, C, L]
    -> num [B, Hkv, G, T, Dv], den and log_scale [B, Hkv, G, T]. The kernel maps query head h
    to KV head h // G and broadcasts the mask over heads, so neither keys nor mask are copied
    per query head."""
    batch, num_kv, group, seq_len, dim = q.shape
    num_blocks, width = keys.shape[2], keys.shape[3]
    heads = num_kv * group
    q = F.pad(q, (0, 0, 0, pad)).view(batch, heads, num_blocks, block, dim).transpose(1, 2)

    def per_block(x: Tensor) -> Tensor:  # [B, Hkv, N, L, E] -> [B N, Hkv, L, E]
        return x.transpose(1, 2).reshape(batch * num_blocks, num_kv, width, -1)

    mask = bias.reshape(batch * num_blocks, 1, block, width)
    seen = (bias > float("-inf")).any(-1).reshape(batch * num_blocks, 1, block)
    parts = fused_softmax_parts(
        q.reshape(batch * num_blocks, heads, block, dim), per_block(keys), per_block(values),
        mask, seen, 1.0,
    )  # fmt: skip

    def back(x: Tensor) -> Tensor:  # [B N, Hq, C, ...] -> [B, Hkv, G, T, ...]
        x = x.view(batch, num_blocks, num_kv, group, block, *x.shape[3:])
        x = x.permute(0, 2, 3, 1, 4, *range(5, x.dim()))
        return x.reshape(batch, num_kv, group, num_blocks * block, *x.shape[5:])[:, :, :, :seq_len]

    num, den, log_scale = parts
    return back(num), back(den), back(log_scale)


def _write_new(cache: LocalKV, k: Tensor, v: Tensor, pos: Tensor, unpadded: bool) -> LocalKV:
    """Store a chunk's keys in the cache; without padding only the first S and last W tokens of
    the chunk can survive it, so only those are written."""
    seq_len = k.shape[2]
    if unpadded and seq_len > cache.num_sinks + cache.ring_size:
        keep = torch.cat([_arange(cache.num_sinks, k), _arange(cache.ring_size, k) + seq_len
                          - cache.ring_size])  # fmt: skip
        k, v, pos = k[:, :, keep], v[:, :, keep], pos[:, keep]
    return write_local(cache, k, v, pos)


def _to_blocks(q: Tensor, block: int, pad: int) -> Tensor:
    """[B, H, G, T, D] -> [B, H, N, G C, D]: each block of C queries, its G heads stacked."""
    batch, num_kv, group, _, dim = q.shape
    blocks = F.pad(q, (0, 0, 0, pad)).view(batch, num_kv, group, -1, block, dim).transpose(2, 3)
    return blocks.reshape(batch, num_kv, -1, group * block, dim)


def _arange(count: int, like: Tensor) -> Tensor:
    return torch.arange(count, device=like.device)


def _from_blocks(x: Tensor, group: int, seq_len: int) -> Tensor:
    """[B, H, N, G C, E] -> [B, H, G, T, E]."""
    batch, num_kv, num_blocks, rows, last = x.shape
    x = x.view(batch, num_kv, num_blocks, group, rows // group, last).transpose(2, 3)
    return x.reshape(batch, num_kv, group, -1, last)[:, :, :, :seq_len]


def _block_keys(tail: Tensor, new: Tensor, sinks: Tensor, block: int, pad: int) -> Tensor:
    """Keys (or values) of each block of C queries: the band of W + C, then the S sinks.

    tail [B, H, W, D] (the cached window before the chunk), new [B, H, T, D], sinks [B, H, S, D]
    -> [B, H, N, W + C + S, D]."""
    ring = tail.shape[2]
    stream = F.pad(torch.cat([tail.to(new.dtype), new], dim=2), (0, 0, 0, pad))
    bands = stream.unfold(2, ring + block, block).transpose(-1, -2)  # [B, H, N, W + C, D]
    sinks = sinks.to(new.dtype)[:, :, None].expand(-1, -1, bands.shape[2], -1, -1)
    return torch.cat([bands, sinks], dim=3)


def write_local(cache: LocalKV, k: Tensor, v: Tensor, pos: Tensor) -> LocalKV:
    """Store new keys/values (positions pos [B, C], increasing, -1 = padding) in their slots.

    Sink positions go to slots [0, num_sinks); of the others only the last ring_size can still
    be needed, each in slot num_sinks + (p - num_sinks) % ring_size. The rest (and padding) go
    to a scratch slot that is dropped, so no two writes target one slot. Returns a new cache.
    """
    sinks, ring = cache.num_sinks, cache.ring_size
    is_recent = pos > pos.amax(dim=1, keepdim=True) - ring
    slot = cache.slot_of(pos)  # padding (-1) is sent to the scratch slot below
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


@dataclass(frozen=True)
class LocalStepPlan:
    """Slot bookkeeping of one decode step. Every layer's local cache holds the same positions,
    so a model builds this once per step and all its layers share it.

    write: [B, 1, L, 1] bool, the slot the new token takes; pos: [B, L] slot positions after the
    write; bias: [B, 1, 1, L] 0 where the new query sees the slot, -inf elsewhere; evicted:
    [B, 1, 1, L] one-hot of the overwritten slot; evicted_bias: [B, 1, 1, 1] 0 if that slot held
    the key now leaving the sliding window (not a sink), else -inf; num_tokens: [B] after the step;
    slot: [B] the written slot's index; sink_bias: [B, S] 0 where the far tier sees the sink
    (`LocalSpec.far_sinks`), -inf elsewhere. in_place: the step writes the new key and value
    into the given cache itself (the caller gives that cache up) instead of into a copy.
    """

    write: Tensor
    pos: Tensor
    bias: Tensor
    evicted: Tensor
    evicted_bias: Tensor
    num_tokens: Tensor
    slot: Tensor
    sink_bias: Tensor
    in_place: bool = False

    def flat(self) -> tuple[Tensor, ...]:
        """The tensors, in field order (`LocalStepPlan(*flat, in_place=...)` rebuilds it)."""
        return (self.write, self.pos, self.bias, self.evicted, self.evicted_bias, self.num_tokens,
                self.slot, self.sink_bias)  # fmt: skip


def local_step_plan(
    cache: LocalKV, num_tokens: Tensor, spec: LocalSpec, *, in_place: bool = False
) -> LocalStepPlan:
    """The plan for one new token per row at positions num_tokens [B]."""
    sinks, ring = cache.num_sinks, cache.ring_size
    slot = cache.slot_of(num_tokens)
    is_slot = torch.arange(cache.pos.shape[1], device=slot.device)[None] == slot[:, None]  # [B, L]
    pos = torch.where(is_slot, num_tokens[:, None], cache.pos)
    left = num_tokens - ring
    evicted_valid = (cache.pos.gather(1, slot[:, None]) == left[:, None]) & (left >= sinks)[:, None]
    visible = spec.visible(num_tokens[:, None], pos)
    far_sinks = spec.far_sink_visible(num_tokens[:, None], pos[:, :sinks])
    dtype = torch.promote_types(cache.k.dtype, torch.float32)  # the compute dtype
    return LocalStepPlan(
        write=is_slot[:, None, :, None],
        pos=pos,
        bias=_log_mask(visible, dtype)[:, None, None, :],
        evicted=is_slot.to(dtype)[:, None, None, :],
        evicted_bias=_log_mask(evicted_valid, dtype)[:, None, None],
        num_tokens=num_tokens + 1,
        slot=slot,
        sink_bias=_log_mask(far_sinks, dtype),
        in_place=in_place,
    )


def _log_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """True -> 0, False -> -inf: a mask to add to logits."""
    return torch.where(mask, 0.0, float("-inf")).to(dtype)


def local_step_parts(
    q: Tensor, k: Tensor, v: Tensor, cache: LocalKV, plan: LocalStepPlan, *, scale: float
) -> tuple[list[Parts], Tensor, Tensor]:
    """Decode: one new token per row, q [B, Hkv, G, D] (grouped), k, v [B, Hkv, 1, D].

    Reads the cache before the token's write (`write_local_step`): the query sees the slots as
    they were, less the one being overwritten, plus the new token. Returns the softmax parts of
    those two (`slot_softmax`), and the key and value the overwritten slot held ([B, Hkv, 1, D];
    `plan.evicted_bias` says whether that is the key leaving the window). Nothing is written
    here, so a compiled step reads the cache where it is and then writes one slot, with no copy
    of the cache.
    """
    q = q * scale
    kept = plan.bias.masked_fill(plan.write.transpose(-1, -2), float("-inf"))[:, 0, 0]  # [B, L]
    parts = [
        slot_softmax(q, cache.k, cache.v, kept),
        one_slot(q @ k.to(q.dtype).transpose(-1, -2), v),
    ]
    if plan.in_place:  # advanced indexing: reads one slot
        rows = torch.arange(k.shape[0], device=k.device)
        evicted_k = cache.k[rows, :, plan.slot][:, :, None]
        evicted_v = cache.v[rows, :, plan.slot][:, :, None]
    else:  # one-hot products: cheaper than advanced indexing for small windows, uncompiled
        evicted = plan.evicted.to(cache.k.dtype)  # one-hot: exact in any dtype
        evicted_k, evicted_v = evicted @ cache.k, evicted @ cache.v
    return parts, evicted_k.to(k.dtype), evicted_v.to(v.dtype)


def write_local_step(cache: LocalKV, k: Tensor, v: Tensor, plan: LocalStepPlan) -> LocalKV:
    """The cache with the new token in its slot: the given cache itself with `plan.in_place`
    (the caller gives it up; one slot per row is touched), else a copy."""
    if plan.in_place:
        rows = torch.arange(k.shape[0], device=k.device)
        cache.k[rows, :, plan.slot] = k[:, :, 0].to(cache.k.dtype)
        cache.v[rows, :, plan.slot] = v[:, :, 0].to(cache.v.dtype)
        return LocalKV(cache.k, cache.v, plan.pos, cache.num_sinks)
    return LocalKV(
        torch.where(plan.write, k.to(cache.k.dtype), cache.k),
        torch.where(plan.write, v.to(cache.v.dtype), cache.v),
        plan.pos,
        cache.num_sinks,
    )
