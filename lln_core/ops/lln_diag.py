"""LLN combined with a bounded local softmax branch (LLN+Diag and its sliding-window variant).

Two ways to combine, both with constant memory per sequence:
- "average" (the LLN paper): y = r * y_LLN + (1 - r) * y_local, each normalised on its own, LLN
  over all past keys. `mix` is r, the weight of the LLN output.
- "joint" (sliding window + sinks, as in LoLCATs/StreamingLLM): one softmax-like normalisation
  over the local keys (exp(q.k * scale)) and the older keys (LLN weights times exp(mix)), with a
  shared log-space max. `mix` is the log-weight of the LLN part. The LLN state then holds only
  keys that left the window (sinks excluded): it is fed the key stream delayed by the window.
  `count_power` makes that weight length-aware: the LLN part's log-weight is
  mix - count_power * log(n_old), n_old the number of old keys the query sees. LLN's total mass
  grows with n_old, and not as softmax's does; a power fitted on long text keeps the balance
  between window and state at lengths the mix alone was not fitted for.

Joint only: a sparse cache of G exact pairs (`lln_core.ops.sparse`) sits between the window and
the LLN state. Keys leaving the window go there first; the cache keeps the G best by a
retention score the caller gives for each leaving key (`evict_score`), and only the keys it lets
go are merged into the LLN state. Cached pairs join the window and sinks in the softmax part of
the one normalisation.

Joint only: the far tier (the sinks once the window has passed them, the sparse cache, the LLN
state) is read with its own queries and takes keys as they leave the window through a `FarTier`
(`lln_core.ops.far`: one fixed rotary distance); without one it sees the rotated queries and
keys as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from lln_core.ops.common import (
    check_qkv,
    compute_dtype,
    count_tokens,
    feature_logits,
    group_queries,
    per_head,
    round_to,
    ungroup,
    valid_tokens,
)
from lln_core.ops.far import FarTier, rotate
from lln_core.ops.lln.chunk import (
    SEGMENT_TOKENS,
    TINY,
    LLNParts,
    lln_chunk_parts,
    mask_padding,
)
from lln_core.ops.lln.recurrent import lln_step_parts
from lln_core.ops.slot_softmax import one_slot, slot_softmax, softmax_of_parts
from lln_core.ops.softmax import (
    LocalSpec,
    LocalStepPlan,
    local_softmax_parts,
    local_step_parts,
    local_step_plan,
    read_window_tail,
    write_local_step,
)
from lln_core.ops.sparse import (
    SparsePlan,
    add_parts,
    gather_candidates,
    leaving_plan,
    naive_sparse_mask,
    sparse_parts,
)
from lln_core.state import LLNState, SparseKV

Combine = Literal["average", "joint"]


def empty_lln_diag_state(
    batch: int,
    num_kv_heads: int,
    head_dim: int,
    local: LocalSpec,
    *,
    v_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    sparse_size: int = 0,
    kv_dtype: torch.dtype | None = None,
) -> LLNState:
    """sparse_size: G exact pairs kept beyond the window (joint combination), 0 for none.
    kv_dtype: storage of the exact keys/values (window and sparse cache), default `dtype`; they
    are computed with in `dtype`, so keys should already be representable in it (the model
    rounds them once, so that prefill and decode see the same numbers)."""
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    cache = local.empty_cache(
        batch, num_kv_heads, head_dim, v_dim=v_dim, dtype=kv_dtype, device=device
    )
    sparse = None
    if sparse_size:
        sparse = SparseKV.empty(
            batch, num_kv_heads, head_dim, sparse_size, v_dim, kv_dtype, device, score_dtype=dtype
        )
    return LLNState.empty(
        batch, num_kv_heads, head_dim, v_dim, dtype, device, local=cache, sparse=sparse
    )


def lln_diag_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float | Tensor,
    beta: float | Tensor,
    mix: float | Tensor,
    *,
    local: LocalSpec,
    combine: Combine = "joint",
    state: LLNState | None = None,
    chunk_size: int = 64,
    scale: float | None = None,
    lengths: Tensor | None = None,
    count_power: float | Tensor = 0.0,
    evict_score: Tensor | None = None,
    sparse_plan: SparsePlan | None = None,
    far: FarTier | None = None,
) -> tuple[Tensor, LLNState]:
    """Chunked form over T new tokens. Shapes and `lengths` as `lln_attention`; mix and
    count_power (joint only): scalar, [Hkv] or [Hq]. With a sparse cache in the state:
    evict_score [B, T], the retention score of the key that leaves the window at each query
    (position n + i - W); None scores every key alike (the cache keeps the newest). Or
    sparse_plan: the cache's decisions (`leaving_plan`), when a model shares them by layers.
    far (joint): the far tier's queries and key rotation for these T queries."""

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    seq_len = q.shape[2]
    segment = chunk_size * max(1, SEGMENT_TOKENS // chunk_size)
    local = _local_of(local, combine)
    if seq_len <= segment:
        return _forward(
            q, k, v, alpha, beta, mix, local, combine, state, scale, chunk_size, lengths,
            count_power, evict_score, sparse_plan, far,
        )  # fmt: skip
    if sparse_plan is not None:
        raise ValueError(f"a sparse plan covers at most {segment} tokens, got {seq_len}")
    outputs = []
    for start in range(0, seq_len, segment):
        piece = slice(start, start + segment)
        piece_lengths = None if lengths is None else (lengths - start).clamp(0, segment)
        piece_scores = None if evict_score is None else evict_score[:, piece]
        piece_far = None if far is None else far.piece(start, start + segment)
        y, state = _forward(
            q[:, :, piece], k[:, :, piece], v[:, :, piece], alpha, beta, mix, local, combine,
            state, scale, chunk_size, piece_lengths, count_power, piece_scores, None, piece_far,
        )  # fmt: skip
        outputs.append(y)
    return torch.cat(outputs, dim=2), state


def lln_diag_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float | Tensor,
    beta: float | Tensor,
    mix: float | Tensor,
    state: LLNState,
    *,
    local: LocalSpec,
    combine: Combine = "joint",
    scale: float | None = None,
    plan: LocalStepPlan | None = None,
    count_power: float | Tensor = 0.0,
    evict_score: Tensor | None = None,
    sparse_plan: SparsePlan | None = None,
    far: FarTier | None = None,
) -> tuple[Tensor, LLNState]:
    """One decode token per sequence (T = 1): the LLN part by its recurrence, the local part by
    one slot write (rows may sit at different positions). `plan`: the step's slot bookkeeping,
    shared by all layers (`local_step_plan` of the same `LocalSpec`, far sinks set when
    joint); built here when not given. evict_score [B, 1], sparse_plan, far: as in
    `lln_diag_attention`."""
    if q.shape[2] != 1:
        raise ValueError(f"lln_diag_step takes one token per sequence (T = 1), got {q.shape[2]}")
    local = _local_of(local, combine)
    p = _prepare(q, k, v, alpha, beta, mix, local, combine, state, scale, count_power, far)
    if plan is None:
        plan = local_step_plan(p.state.local, p.state.num_tokens, local)
    qg = p.qg[:, :, :, 0]
    parts, old_k, old_v = local_step_parts(qg, p.k, p.v, p.state.local, plan, scale=p.scale)
    if combine == "joint":  # the sinks the window has passed, and the key leaving it
        sinks, cache = local.num_sinks, p.state.local
        if sinks:
            sink_q = p.sq[:, :, :, 0] * p.scale
            parts.append(slot_softmax(sink_q, cache.k[:, :, :sinks], cache.v[:, :, :sinks],
                                      plan.sink_bias))  # fmt: skip
        old_k = p.enter(old_k)
    sparse = p.state.sparse
    if sparse is not None:  # the leaving key enters the sparse cache or goes on to LLN
        sp = sparse_plan or leaving_plan(
            sparse, p.state.num_tokens, 1, window=local.size, num_sinks=local.num_sinks,
            evict_score=evict_score,
        )  # fmt: skip
        leaving_k, leaving_v = old_k, old_v
        old_k, old_v = _merged_step(sparse.k, sparse.v, leaving_k, leaving_v, sp.merged)
        evicted_bias = torch.where(sp.merged_valid, 0.0, float("-inf")).to(old_k.dtype)[:, None]
        # the query sees the cache after the step (`SparsePlan.visible`): the cached pairs
        # that stay, and the leaving pair if it enters; read before the write, as the window
        seen = torch.where(sp.visible[:, 0], 0.0, float("-inf")).to(qg.dtype)  # [B, G + 1]
        q_scaled, cached_k, read_k = p.fq[:, :, :, 0] * p.scale, sparse.k, leaving_k
        if p.gq is not None:  # each pair rotated to where this query reads it
            q_scaled = p.gq[:, :, :, 0] * p.scale
            cos, sin = sp.shared(
                ("grouped-step", p.k.dtype),
                lambda: far.grouped.step_rotation(sp.candidates, p.k.dtype),
            )
            read = torch.cat([sparse.k.to(leaving_k.dtype), leaving_k], dim=2)
            read = rotate(read, cos[:, None], sin[:, None])
            cached_k, read_k = read[:, :, : sparse.size], read[:, :, sparse.size :]
        leaving_logit = q_scaled @ read_k.transpose(-1, -2) + seen[:, None, None, sparse.size :]
        parts += [
            slot_softmax(q_scaled, cached_k, sparse.v, seen[:, : sparse.size]),
            one_slot(leaving_logit, leaving_v),
        ]
    else:
        evicted_bias = plan.evicted_bias[:, :, 0]
    if combine == "joint":  # the LLN state takes the key that left the window, if any
        b, new_v = p.key_logits(old_k) + evicted_bias[:, :, None], old_v
    else:
        b, new_v = p.key_logits(p.k), p.v
    lln, S, z, m = lln_step_parts(p.aq[:, :, :, 0], b[:, :, 0], new_v[:, :, 0], p.state)
    if combine == "joint":  # the LLN part is one pseudo-slot: its log mass and its output
        log_weight = _log_weight(p, p.state.num_tokens[:, None], local)[..., 0]
        lln_logit = torch.log(lln.den) + lln.log_scale + log_weight  # -inf: no old key yet
        lln_value = lln.num / lln.den.clamp_min(TINY)[..., None]
        y = softmax_of_parts([*parts, (lln_value, torch.ones_like(lln_logit), lln_logit)])
    else:
        y = p.weight * lln.normalised() + (1 - p.weight) * softmax_of_parts(parts)
    # the writes come last: nothing reads the window or the cache after them
    cache = write_local_step(p.state.local, p.k, p.v, plan)
    if sparse is not None:
        sparse = _cache_after_step(sparse, sp, leaving_k, leaving_v, in_place=plan.in_place)
    S, z, m = (_written(old, new, plan.in_place) for old, new in
               ((p.state.S, S), (p.state.z, z), (p.state.m, m)))  # fmt: skip
    new_state = LLNState(S, z, m, plan.num_tokens, cache, sparse)
    return ungroup(y[:, :, :, None]).to(q.dtype), new_state


def _written(old: Tensor, new: Tensor, in_place: bool) -> Tensor:
    """`new` in `old`'s dtype; with in_place, written into `old` itself (at 16 sequences the
    copy of S back into the state pool after the step was ~2 ms of a 46 ms step)."""
    if not in_place:
        return new.to(old.dtype)
    return old.copy_(new)


def _merged_step(
    cache_k: Tensor, cache_v: Tensor, leaving_k: Tensor, leaving_v: Tensor, merged: Tensor
) -> tuple[Tensor, Tensor]:
    """A decode step's key and value merged into the LLN state: candidate merged [B, 1] of
    the cache [B, Hkv, G, D] then the leaving pair [B, Hkv, 1, D] (read, not copied)."""
    size = cache_k.shape[2]
    rows = torch.arange(merged.shape[0], device=merged.device)
    slot = merged[:, 0].clamp(max=size - 1)
    from_cache = (merged < size)[:, None, :, None]

    def pick(cache: Tensor, leaving: Tensor) -> Tensor:
        row = cache[rows, :, slot][:, :, None]  # indexed as the write after it: no copy of cache
        return torch.where(from_cache, row.to(leaving.dtype), leaving)

    return pick(cache_k, leaving_k), pick(cache_v, leaving_v)


def _cache_after_step(
    sparse: SparseKV, plan: SparsePlan, leaving_k: Tensor, leaving_v: Tensor, *, in_place: bool
) -> SparseKV:
    """The cache after a decode step: cached pairs keep their slots (`sparse_plan`), so at
    most one slot changes, to the leaving pair; written in place when the caller gives the old
    cache up, else in a copy."""
    entering = plan.keep == sparse.size  # [B, G]: candidate G is the leaving key
    if in_place:
        rows = torch.arange(entering.shape[0], device=entering.device)
        slot, has = entering.to(torch.float32).argmax(dim=1), entering.any(dim=1)[:, None, None]
        for cache, new in ((sparse.k, leaving_k), (sparse.v, leaving_v)):
            current = cache[rows, :, slot]
            cache[rows, :, slot] = torch.where(has, new[:, :, 0].to(cache.dtype), current)
        pos, score = sparse.pos.copy_(plan.pos), sparse.score.copy_(plan.score)
        return SparseKV(sparse.k, sparse.v, pos, score)
    where = entering[:, None, :, None]
    return SparseKV(
        torch.where(where, leaving_k.to(sparse.k.dtype), sparse.k),
        torch.where(where, leaving_v.to(sparse.v.dtype), sparse.v),
        plan.pos,
        plan.score,
    )


def naive_lln_diag_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float | Tensor,
    beta: float | Tensor,
    mix: float | Tensor,
    *,
    local: LocalSpec,
    combine: Combine = "joint",
    scale: float | None = None,
    count_power: float | Tensor = 0.0,
    sparse_size: int = 0,
    scores: Tensor | None = None,
    far_query: Tensor | None = None,
    sink_query: Tensor | None = None,
    far_keys: Tensor | None = None,
    kept_logits: Tensor | None = None,
) -> Tensor:
    """Quadratic reference from position 0: full T x T weights, float64-capable. sparse_size
    (joint): each query keeps exact the G old keys with the best scores [B, T] (per position;
    None: all alike), chosen from scratch for every query. far_query, sink_query [B, Hq, T, D]
    and far_keys [B, Hkv, T, D] (joint): the far tier's queries and every key as the far tier
    holds it (`lln_core.ops.far`), all defaulting to q and k: the sparse cache and the LLN state
    score far_query against far_keys, the sinks past the window sink_query against k.
    kept_logits [B, Hkv, G, T, T] (joint, unscaled): the sparse cache's logits in place of
    far_query against far_keys (grouped far positions: `far.naive_grouped_logits`)."""
    _batch, num_kv_heads, group, seq_len = check_qkv(q, k, v)
    dtype = compute_dtype(q)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qg = group_queries(q, num_kv_heads, dtype)
    fq = qg if far_query is None else group_queries(far_query, num_kv_heads, dtype)
    sq = qg if sink_query is None else group_queries(sink_query, num_kv_heads, dtype)
    fk = (k if far_keys is None else far_keys).to(dtype)
    kk, vv = k.to(dtype)[:, :, None], v.to(dtype)[:, :, None]
    aq = feature_logits(alpha, fq, num_kv_heads, group, query_side=True)
    bk = feature_logits(beta, fk, num_kv_heads, group, query_side=False)[:, :, None]
    log_lln = torch.logsumexp(aq[..., :, None, :] + bk[..., None, :, :], dim=-1)
    log_sm = qg @ kk.transpose(-1, -2) * scale
    pos = torch.arange(seq_len, device=q.device)
    causal = pos[None] <= pos[:, None]
    local = _local_of(local, combine)
    near = local.visible(pos[:, None], pos[None, :])
    w = per_head(mix, num_kv_heads, group, qg, query_side=True)
    ninf = torch.tensor(float("-inf"), dtype=dtype, device=q.device)
    if combine == "average":
        y_lln = torch.softmax(torch.where(causal, log_lln, ninf), dim=-1) @ vv
        y_loc = torch.softmax(torch.where(near, log_sm, ninf), dim=-1) @ vv
        y = w * y_lln + (1 - w) * y_loc
    else:
        _check_joint(local)
        far_sinks = local.far_sink_visible(pos[:, None], pos[None, :])
        old = causal & ~near & ~far_sinks
        power = per_head(count_power, num_kv_heads, group, qg, query_side=True)
        n_old = old.sum(dim=-1, keepdim=True).clamp_min(1).to(dtype)  # per query
        log_weight = w - power * torch.log(n_old)
        kept = torch.zeros_like(old)
        if sparse_size:
            scores = torch.zeros(q.shape[0], seq_len, dtype=dtype) if scores is None else scores
            kept = naive_sparse_mask(old, scores.to(dtype), sparse_size)  # [B, T, T]
            old = old & ~kept
        log_far = fq @ fk[:, :, None].transpose(-1, -2) if kept_logits is None else kept_logits
        log_far = log_far.to(dtype) * scale
        log_sink = sq @ kk.transpose(-1, -2) * scale
        logits = torch.where(old[..., None, None, :, :], log_lln + log_weight, ninf)
        for mask, part in ((far_sinks, log_sink), (kept, log_far), (near, log_sm)):
            logits = torch.where(mask[..., None, None, :, :], part, logits)
        y = torch.softmax(logits, dim=-1) @ vv
    return ungroup(y).to(q.dtype)


@dataclass
class _Prepared:
    """Validated inputs in the compute dtype, grouped and scaled once."""

    qg: Tensor  # [B, Hkv, G, T, D]
    fq: Tensor  # the far tier's queries (sparse cache, LLN), grouped as qg
    sq: Tensor  # the queries of the sinks past the window, grouped as qg
    gq: Tensor | None  # grouped far positions: the sparse cache's queries, grouped as qg
    k: Tensor
    v: Tensor
    aq: Tensor  # alpha fq (or fq through the query feature map)
    beta: float | Tensor  # as given: per-head scale or key feature map
    weight: Tensor  # mix, [1, Hkv, G, 1]
    power: Tensor  # count_power, [1, Hkv, G, 1]
    state: LLNState
    scale: float
    far: FarTier | None

    def enter(self, k: Tensor) -> Tensor:
        """Keys [B, Hkv, T, D] leaving the window, as the far tier keeps them: rotated, and
        rounded to the exact pairs' storage, so that a key reads the same from the sparse cache
        as on its way past it into the LLN state."""
        if self.far is None:
            return k
        return round_to(self.far.enter(k).to(k.dtype), self.state.local.k.dtype)

    def key_logits(self, k: Tensor) -> Tensor:
        """beta k for keys [B, Hkv, T, D] (also keys read back from the window)."""
        num_kv_heads, group = self.qg.shape[1], self.qg.shape[2]
        return feature_logits(self.beta, k, num_kv_heads, group, query_side=False)


def _prepare(
    q, k, v, alpha, beta, mix, local, combine, state, scale, count_power, far=None
) -> _Prepared:
    batch, num_kv_heads, group, _ = check_qkv(q, k, v)
    dtype = compute_dtype(q)
    if combine not in ("average", "joint"):
        raise ValueError(f"combine must be 'average' or 'joint', got {combine!r}")
    if combine == "joint":
        _check_joint(local)
    elif far is not None:
        raise ValueError("a far tier is part of the joint normalisation (combine='joint')")
    if state is None:
        state = empty_lln_diag_state(
            batch, num_kv_heads, q.shape[-1], local, v_dim=v.shape[-1], dtype=dtype, device=q.device
        )
    if state.local is None:
        raise ValueError("LLN+Diag needs a state with a local cache (empty_lln_diag_state)")
    if state.sparse is not None and combine != "joint":
        raise ValueError("a sparse cache joins the joint normalisation (combine='joint')")
    qg = group_queries(q, num_kv_heads, dtype)
    fq = qg if far is None else group_queries(far.query, num_kv_heads, dtype)
    grouped = None if far is None else far.grouped
    return _Prepared(
        qg=qg,
        fq=fq,
        sq=qg if far is None else group_queries(far.sink_query, num_kv_heads, dtype),
        gq=None if grouped is None else group_queries(grouped.query, num_kv_heads, dtype),
        k=k.to(dtype),
        v=v.to(dtype),
        aq=feature_logits(alpha, fq, num_kv_heads, group, query_side=True),
        beta=beta,
        weight=per_head(mix, num_kv_heads, group, qg, query_side=True)[..., 0],
        power=per_head(count_power, num_kv_heads, group, qg, query_side=True)[..., 0],
        state=state,
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale,
        far=far,
    )


def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float | Tensor,
    beta: float | Tensor,
    mix: float | Tensor,
    local: LocalSpec,
    combine: Combine,
    state: LLNState | None,
    scale: float | None,
    chunk_size: int,
    lengths: Tensor | None = None,
    count_power: float | Tensor = 0.0,
    evict_score: Tensor | None = None,
    sparse_plan: SparsePlan | None = None,
    far: FarTier | None = None,
) -> tuple[Tensor, LLNState]:
    """Chunked form over T tokens (prefill)."""
    p = _prepare(q, k, v, alpha, beta, mix, local, combine, state, scale, count_power, far)
    batch, seq_len = q.shape[0], q.shape[2]
    valid = valid_tokens(lengths, batch, seq_len, q.device)
    tail = read_window_tail(p.state.local, p.state.num_tokens)  # keys n-W .. n-1, read once
    if combine == "joint" and _inside_window(p.state, seq_len, local):
        return _window_only(p, local, valid, tail, q.dtype)
    sparse = p.state.sparse
    if combine == "joint":
        old_k, old_v, old_valid = _delayed_keys(p.state, tail, p.k, p.v)
        old_k = p.enter(old_k)
        if valid is not None:
            old_valid = old_valid & valid
        if sparse is not None:  # the cache takes the leaving keys and lets go of others
            sp = sparse_plan or leaving_plan(
                sparse, p.state.num_tokens, seq_len, window=local.size,
                num_sinks=local.num_sinks, evict_score=evict_score, valid=valid,
            )  # fmt: skip
            (cand_k, cand_v), (old_k, old_v), sparse = _through_cache(sparse, sp, old_k, old_v)
            old_valid = sp.merged_valid
        b, old_v = mask_padding(p.key_logits(old_k), old_v, old_valid)
    elif valid is not None:
        b, old_v = mask_padding(p.key_logits(p.k), p.v, valid)
    else:
        b, old_v = p.key_logits(p.k), p.v
    lln, S, z, m = lln_chunk_parts(p.aq, b, old_v, p.state, chunk_size)
    num, den, log_scale, cache = local_softmax_parts(
        p.qg, p.k, p.v, p.state.local, p.state.num_tokens, local,
        scale=p.scale, valid=valid, tail=tail,
    )  # fmt: skip
    if combine == "joint":
        positions = p.state.num_tokens[:, None] + torch.arange(seq_len, device=q.device)
        if local.num_sinks:
            sinks = _far_sink_parts(p, cache, positions, local, valid)
            num, den, log_scale = add_parts((num, den, log_scale), sinks)
        if sparse is not None:
            if p.gq is None:
                seen_k = gather_candidates(cand_k, sp.columns)
                seen_v = gather_candidates(cand_v, sp.columns)
                exact = sparse_parts(p.fq, seen_k, seen_v, sp.visible, p.scale, plan=sp)
            else:
                exact = _grouped_sparse_parts(p, cand_k, cand_v, sp)
            num, den, log_scale = add_parts((num, den, log_scale), exact)
        y = _joint(lln, num, den, log_scale, _log_weight(p, positions, local))
    else:
        w = p.weight[..., None]
        y = w * lln.normalised() + (1 - w) * num / den[..., None]
    added = count_tokens(valid, seq_len)
    return ungroup(y).to(q.dtype), _new_state(p.state, S, z, m, added, cache, sparse)


def _inside_window(state: LLNState, seq_len: int, local: LocalSpec) -> bool:
    """Whether every one of the T queries sees only the window: no key has left it by the
    last query (position n + T - 1 < W), so the far tier and the LLN state add nothing. Not
    where gradients flow: training reaches the LLN parameters through those parts."""
    if torch.is_grad_enabled():
        return False
    return int(state.num_tokens.max()) + seq_len <= local.size


def _window_only(
    p: _Prepared, local: LocalSpec, valid: Tensor | None, tail, dtype: torch.dtype
) -> tuple[Tensor, LLNState]:
    """`_forward` where `_inside_window`: the window's softmax alone (a short prompt's prefill
    skips the far tier's and the LLN state's work, which would weigh nothing)."""
    num, den, _, cache = local_softmax_parts(
        p.qg, p.k, p.v, p.state.local, p.state.num_tokens, local,
        scale=p.scale, valid=valid, tail=tail,
    )  # fmt: skip
    added = count_tokens(valid, p.qg.shape[3])
    state = p.state
    new_state = _new_state(state, state.S, state.z, state.m, added, cache, state.sparse)
    return ungroup(num / den[..., None]).to(dtype), new_state


def _grouped_sparse_parts(
    p: _Prepared, cand_k: Tensor, cand_v: Tensor, sp: SparsePlan
) -> tuple[Tensor, Tensor, Tensor]:
    """The sparse cache's softmax parts at grouped far positions (`lln_core.ops.far`): one part
    per group among the queries (one, but where the context passes a doubling)."""
    grouped = p.far.grouped

    def shared():  # the same for every layer: made once per plan
        pos = sp.candidates.gather(1, sp.columns)  # [B, M]
        return [
            (grouped.key_rotation(pos, group, p.k.dtype),
             sp.visible & (grouped.group == group)[:, :, None])
            for group in grouped.group.unique().tolist()
        ]  # fmt: skip

    seen_k = gather_candidates(cand_k, sp.columns)
    seen_v = gather_candidates(cand_v, sp.columns)
    parts = None
    for (cos, sin), visible in sp.shared(("grouped", p.k.dtype), shared):
        keys = rotate(seen_k, cos[:, None], sin[:, None])
        part = sparse_parts(p.gq, keys, seen_v, visible, p.scale)
        parts = part if parts is None else add_parts(parts, part)
    return parts


def _far_sink_parts(
    p: _Prepared, cache, positions: Tensor, local: LocalSpec, valid: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax parts of the sinks the window has passed, for queries at positions [B, T] (the
    cache after the chunk holds every sink a query of it can see)."""
    sinks = local.num_sinks
    seen = local.far_sink_visible(positions[:, :, None], cache.pos[:, None, :sinks])
    if valid is not None:
        seen = seen & valid[:, :, None]
    k, v = cache.k[:, :, :sinks].to(p.k.dtype), cache.v[:, :, :sinks].to(p.v.dtype)
    return sparse_parts(p.sq, k, v, seen, p.scale)


def _local_of(local: LocalSpec, combine: Combine) -> LocalSpec:
    """Joint: sinks past the window belong to the far tier, not the local branch."""
    return replace(local, far_sinks=True) if combine == "joint" else local


def _log_weight(p: _Prepared, positions: Tensor, local: LocalSpec) -> Tensor:
    """The LLN part's log-weight for queries at `positions` [B, T]: [B, Hkv, G, T]."""
    n_old = (positions - (local.size + local.num_sinks - 1)).clamp_min(1).to(p.weight.dtype)
    return p.weight - p.power * torch.log(n_old)[:, None, None, :]


def _new_state(
    state: LLNState, S: Tensor, z: Tensor, m: Tensor, added: Tensor | int, cache, sparse
) -> LLNState:
    return LLNState(
        S=S.to(state.S.dtype),
        z=z.to(state.z.dtype),
        m=m.to(state.m.dtype),
        num_tokens=state.num_tokens + added,
        local=cache,
        sparse=sparse,
    )


def _through_cache(
    sparse: SparseKV, plan: SparsePlan, leaving_k: Tensor, leaving_v: Tensor
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], SparseKV]:
    """The leaving keys [B, Hkv, T, D] go through the cache: the candidates (cached pairs, then
    the leaving ones), the keys merged into the LLN state at each query, and the new cache."""
    cand_k = torch.cat([sparse.k.to(leaving_k.dtype), leaving_k], dim=2)
    cand_v = torch.cat([sparse.v.to(leaving_v.dtype), leaving_v], dim=2)
    merged = gather_candidates(cand_k, plan.merged), gather_candidates(cand_v, plan.merged)
    k, v = gather_candidates(cand_k, plan.keep), gather_candidates(cand_v, plan.keep)
    kept = SparseKV(k.to(sparse.k.dtype), v.to(sparse.v.dtype), plan.pos, plan.score)
    return (cand_k, cand_v), merged, kept


def _check_joint(local: LocalSpec) -> None:
    if local.kind != "window":
        raise ValueError("combine='joint' needs a sliding window (local kind 'window')")


def _delayed_keys(
    state: LLNState, tail: tuple[Tensor, Tensor, Tensor], k: Tensor, v: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The key stream delayed by the window: entry i is the key at position n + i - W.

    Query n + i sees, through LLN, exactly the keys up to that position (sinks excluded).
    tail: `read_window_tail` of the state.
    """
    seq_len = k.shape[2]
    tail_k, tail_v, tail_valid = tail
    pos = state.num_tokens[:, None] + torch.arange(seq_len, device=k.device)
    valid = torch.cat([tail_valid, pos >= state.local.num_sinks], dim=1)[:, :seq_len]
    old_k = torch.cat([tail_k.to(k.dtype), k], dim=2)[:, :, :seq_len]
    old_v = torch.cat([tail_v.to(v.dtype), v], dim=2)[:, :, :seq_len]
    return old_k, old_v, valid


def _joint(
    lln: LLNParts, loc_num: Tensor, loc_den: Tensor, loc_scale: Tensor, log_weight: Tensor
) -> Tensor:
    """One normalisation over local (softmax) and old (weighted LLN) keys, shared log max."""
    lln_scale = torch.where(lln.den > 0, lln.log_scale + log_weight, float("-inf"))
    top = torch.maximum(loc_scale, lln_scale)
    w_loc = torch.exp(loc_scale - top)
    w_lln = torch.exp(lln_scale - top)
    num = w_loc[..., None] * loc_num + w_lln[..., None] * lln.num
    den = w_loc * loc_den + w_lln * lln.den
    return num / den[..., None]
