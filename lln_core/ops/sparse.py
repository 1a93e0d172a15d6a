"""The sparse tier of LLN+Diag: a bounded cache of exact key/value pairs beyond the window.

Keys leave the sliding window one per query, oldest first. Each leaving key gets a retention
score (given by the caller; the model uses the surprise of the text around the token). The
cache holds the G best-scored keys that have left the window so far (ties: the newer key), the
same positions in every head; a key pushed out of the G best is merged into the LLN state at
that moment and never comes back. Because a key's score never changes, the cache after any
prefix of the stream is the top G of that prefix: chunked prefill and the decode step make the
same decisions whatever the split, and `naive_sparse_mask` recomputes them from scratch.

LoLA (arXiv 2505.23666) scores keys in groups by each head's self-recall error, which changes
as the state changes; measured on SmolLM2-135M that keeps scattered pieces of a fact
(`../shared/notes/recall-prototype.md`), so the score here is an input, fixed per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lln_core.ops.common import fused_softmax_fits, fused_softmax_parts
from lln_core.state import SparseKV


@dataclass(frozen=True)
class SparsePlan:
    """The cache's decisions over T queries, the same for every layer and head.

    Candidates are the G cached pairs at the start, then the T keys that leave the window (one
    per query, position n + i - W). columns: [B, M] the candidates some query sees (a chunk's
    attention looks at these only; most leaving keys never enter a full cache); visible:
    [B, T, M] column m is in the cache at query i; merged: [B, T] the candidate merged into the
    LLN state at query i, merged_valid [B, T] whether one is; keep: [B, G] the candidate in each
    slot after the T queries; pos, score: [B, G] the new cache's positions (-1 = empty) and
    scores; candidates: [B, G + T] every candidate's position (-1 = none).
    """

    columns: Tensor
    visible: Tensor
    merged: Tensor
    merged_valid: Tensor
    keep: Tensor
    pos: Tensor
    score: Tensor
    candidates: Tensor
    # what every layer needs of the plan alike (the fused kernel's mask, the far tier's key
    # rotations), made by the first layer that asks
    _shared: dict = field(default_factory=dict, compare=False, repr=False)

    def shared(self, key: tuple, make):
        """make() once per plan, under `key`; later calls (the other layers) reuse it."""
        if key not in self._shared:
            self._shared[key] = make()
        return self._shared[key]

    def fused_mask(self, group: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The visibility as an additive mask [B, 1, G T, M] (0 or -inf) for G query heads
        per KV head, and whether each of those G T queries sees any candidate [B, 1, G T]."""
        return self.shared(("mask", group, dtype), lambda: fused_mask(self.visible, group, dtype))

    def flat(self) -> tuple[Tensor, ...]:
        """The tensors in field order (`SparsePlan(*flat)` rebuilds it)."""
        return (self.columns, self.visible, self.merged, self.merged_valid, self.keep, self.pos,
                self.score, self.candidates)  # fmt: skip


def leaving_plan(
    cache: SparseKV,
    num_tokens: Tensor,
    seq_len: int,
    *,
    window: int,
    num_sinks: int,
    evict_score: Tensor | None = None,
    valid: Tensor | None = None,
) -> SparsePlan:
    """The plan for T new tokens per row from positions num_tokens [B]: at query n + i the key
    at n + i - window leaves the window (if it is past the sinks and the query is not padding,
    valid [B, T]). evict_score [B, T]: the leaving keys' scores (None: all alike, so the newest
    stay). Every layer holds the same positions, so a model builds this once per forward."""
    pos = num_tokens[:, None] + torch.arange(seq_len, device=num_tokens.device) - window
    leaving = pos >= num_sinks
    if valid is not None:
        leaving = leaving & valid
    if evict_score is None:
        evict_score = torch.zeros(pos.shape, dtype=cache.score.dtype, device=pos.device)
    if seq_len == 1:
        return step_sparse_plan(cache, pos, evict_score, leaving)
    return sparse_plan(cache, pos, evict_score, leaving, compact=True)


def outranks(score: Tensor, pos: Tensor) -> Tensor:
    """[B, N] scores and positions -> [B, N, N] bool: candidate a (dim 1) ranks above b (dim 2).
    Higher score first, then the newer position; empty candidates (pos < 0) rank above nothing."""
    s_a, s_b = score[:, :, None], score[:, None, :]
    above = (s_a > s_b) | ((s_a == s_b) & (pos[:, :, None] > pos[:, None, :]))
    return above & (pos >= 0)[:, :, None]


def sparse_plan(
    cache: SparseKV,
    evict_pos: Tensor,
    evict_score: Tensor,
    evict_valid: Tensor,
    *,
    compact: bool = True,
) -> SparsePlan:
    """Decisions for T queries whose leaving keys sit at evict_pos [B, T] with scores
    evict_score [B, T]; evict_valid [B, T] is False where no key leaves (sinks, padding, the
    start of a sequence). compact: keep only the candidates some query sees as columns (data-
    dependent width); else every candidate is a column (fixed shapes, for a decode step)."""
    size, seq_len = cache.size, evict_pos.shape[1]
    device = evict_pos.device
    pos = torch.cat([cache.pos, torch.where(evict_valid, evict_pos, -1)], dim=1)  # [B, N]
    score = torch.cat([cache.score, evict_score.to(cache.score.dtype)], dim=1)
    score = torch.where(pos >= 0, score, float("-inf"))
    query = torch.arange(seq_len, device=device)
    arrival = torch.cat([torch.full((size,), -1, device=device), query])  # [N]
    present = (arrival[None, :] <= query[:, None])[None] & (pos >= 0)[:, None]  # [B, T, N]
    if compact and int((pos >= 0).sum(dim=1).max()) <= size:
        visible = present  # every candidate fits: no ranking (it is O(N^2) in a large cache)
    else:
        above = outranks(score, pos).to(torch.int32)  # [B, N, N]
        # candidates that rank above c among those present at query i: the start cache, then
        # the keys that left by i (a running count)
        ahead = above[:, :size].sum(dim=1)[:, None] + above[:, size:].cumsum(dim=1)  # [B, T, N]
        visible = present & (ahead < size)
    before = torch.cat([present[:, :1] & (arrival < 0), visible[:, :-1]], dim=1)
    was = before | (arrival[None, None] == query[None, :, None])
    dropped = was & (pos >= 0)[:, None] & ~visible  # at most one per query
    keep, keep_valid = _compact(visible[:, -1], size)
    columns = torch.arange(pos.shape[1], device=device).expand(pos.shape[0], -1)
    if compact:  # the seen candidates first, in order; as many columns as the busiest row
        seen = visible.any(dim=1)
        width = max(int(seen.sum(dim=1).max()), 1)
        columns = torch.sort((~seen).to(torch.int8), dim=1, stable=True).indices[:, :width]
        visible = visible.gather(2, columns[:, None].expand(-1, seq_len, -1))
    return SparsePlan(
        columns=columns,
        visible=visible,
        merged=dropped.to(torch.float32).argmax(dim=-1),  # inductor mis-indexes int8 argmax
        merged_valid=dropped.any(dim=-1),
        keep=keep,
        pos=torch.where(keep_valid, pos.gather(1, keep), -1),
        score=torch.where(keep_valid, score.gather(1, keep), float("-inf")),
        candidates=pos,
    )


def step_sparse_plan(
    cache: SparseKV, evict_pos: Tensor, evict_score: Tensor, evict_valid: Tensor
) -> SparsePlan:
    """`sparse_plan` for one query (T = 1, every candidate a column) in O(G) instead of O(G^2):
    with at most G + 1 candidates present, the cache keeps all of them but the one that ranks
    last, and lets that one go only when all G + 1 are present."""
    pos = torch.cat([cache.pos, torch.where(evict_valid, evict_pos, -1)], dim=1)  # [B, G + 1]
    score = torch.cat([cache.score, evict_score.to(cache.score.dtype)], dim=1)
    present = pos >= 0
    lowest = torch.where(present, score, float("inf")).amin(dim=1, keepdim=True)
    tied = present & (score == lowest)  # the last-ranked: lowest score, then the oldest
    oldest = torch.where(tied, pos, torch.iinfo(pos.dtype).max).amin(dim=1, keepdim=True)
    full = present.sum(dim=1, keepdim=True) > cache.size
    dropped = tied & (pos == oldest) & full
    visible = present & ~dropped
    keep, keep_valid = _compact(visible, cache.size)
    score = torch.where(present, score, float("-inf"))
    return SparsePlan(
        columns=torch.arange(pos.shape[1], device=pos.device).expand(pos.shape[0], -1),
        visible=visible[:, None],
        merged=dropped.to(torch.float32).argmax(dim=-1, keepdim=True),
        merged_valid=dropped.any(dim=-1, keepdim=True),
        keep=keep,
        pos=torch.where(keep_valid, pos.gather(1, keep), -1),
        score=torch.where(keep_valid, score.gather(1, keep), float("-inf")),
        candidates=pos,
    )


def _compact(final: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Slots for the candidates in the cache at the end, final [B, N]: a cached pair that stays
    keeps its slot (a decode step rewrites at most one slot); new ones fill the freed slots in
    order. Returns keep [B, G] (candidate index per slot) and whether the slot is used."""
    batch, num = final.shape
    stays = final[:, :size]
    arrived = final[:, size:]
    free_rank = (~stays).to(torch.int64).cumsum(dim=1) - 1  # [B, G]
    arrived_rank = arrived.to(torch.int64).cumsum(dim=1) - 1  # [B, T]
    count = num - size
    by_rank = torch.zeros(batch, count + 1, dtype=torch.int64, device=final.device)
    target = torch.where(arrived, arrived_rank, count)  # junk column at `count`
    source = torch.arange(size, num, device=final.device).expand(batch, -1)
    by_rank = by_rank.scatter(1, target, source)
    rank = free_rank.clamp(0, count)
    fills = ~stays & (rank < arrived.sum(dim=1, keepdim=True))
    slots = torch.arange(size, device=final.device).expand(batch, -1)
    keep = torch.where(stays, slots, torch.where(fills, by_rank.gather(1, rank), 0))
    return keep, stays | fills


def gather_candidates(x: Tensor, index: Tensor) -> Tensor:
    """x [B, H, N, D] at candidate indices index [B, M] -> [B, H, M, D]."""
    idx = index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1])
    return x.gather(2, idx)


def sparse_parts(
    q: Tensor,
    cand_k: Tensor,
    cand_v: Tensor,
    visible: Tensor,
    scale: float,
    plan: SparsePlan | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Unnormalised softmax of queries q [B, Hkv, G, T, D] over the cached candidates
    cand_k/cand_v [B, Hkv, N, D] visible to each query (visible [B, T, N]): num [B, Hkv, G, T,
    Dv], den and log_scale [B, Hkv, G, T] (den = 0 where no pair is cached). plan: the plan
    whose `visible` this is, so that the layers share its fused kernel's mask."""
    if fused_softmax_fits(q, cand_k, cand_v):
        group = q.shape[2]
        mask, any_seen = (plan.fused_mask(group, q.dtype) if plan is not None
                          else fused_mask(visible, group, q.dtype))  # fmt: skip
        return _fused_sparse_parts(q, cand_k, cand_v, mask, any_seen, scale)
    logits = (q * scale) @ cand_k[:, :, None].transpose(-1, -2)  # [B, Hkv, G, T, N]
    seen = visible[:, None, None].to(logits.dtype)
    # a broadcast add and multiply cost a tenth of masked_fill with a broadcast mask, and
    # the clamp keeps exp off its slow path (-inf and underflowing inputs, see exp_ftz)
    bias = (seen - 1) * torch.finfo(logits.dtype).max  # 0 or a finite -max: never inf - inf
    inplace = not logits.requires_grad  # the biggest tensor of a prefill piece: reuse it
    logits = logits.add_(bias) if inplace else logits + bias
    top = logits.amax(dim=-1, keepdim=True)
    any_seen = visible.any(dim=-1)[:, None, None, :, None]
    log_scale = torch.where(any_seen, top, torch.zeros_like(top))
    logits = logits.sub_(log_scale) if inplace else logits - log_scale
    floor = math.floor(math.log(torch.finfo(logits.dtype).tiny)) + 1
    weights = logits.clamp_(min=floor).exp_() if inplace else logits.clamp(min=floor).exp()
    weights = weights.mul_(seen) if inplace else weights * seen  # exact zeros where unseen
    log_scale = log_scale[..., 0]
    return weights @ cand_v[:, :, None], weights.sum(-1), log_scale


def fused_mask(visible: Tensor, group: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """visible [B, T, M] -> `SparsePlan.fused_mask`."""
    batch, seq_len, _ = visible.shape
    seen = visible[:, None].expand(-1, group, -1, -1)
    mask = torch.zeros(seen.shape, dtype=dtype, device=seen.device)
    mask = mask.masked_fill_(~seen, float("-inf")).view(batch, 1, group * seq_len, -1)
    any_seen = visible.any(dim=-1)[:, None].expand(-1, group, -1)
    return mask, any_seen.reshape(batch, 1, group * seq_len)


def _fused_sparse_parts(
    q: Tensor, cand_k: Tensor, cand_v: Tensor, mask: Tensor, any_seen: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """`sparse_parts` in one fused kernel (measured 1.9x faster single-threaded at 441 queries
    x 1258 candidates): the G query heads of a KV head go in as one sequence of G T queries;
    mask and any_seen as `SparsePlan.fused_mask`."""
    batch, num_kv, group, seq_len, dim = q.shape
    num, den, log_scale = fused_softmax_parts(
        q.reshape(batch, num_kv, group * seq_len, dim), cand_k, cand_v, mask, any_seen, scale
    )
    shape = (batch, num_kv, group, seq_len)
    return num.view(*shape, -1), den.view(shape), log_scale.view(shape)


def add_parts(
    a: tuple[Tensor, Tensor, Tensor], b: tuple[Tensor, Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Sum of two unnormalised softmax parts (num, den, log_scale) under a shared log max."""
    num_a, den_a, scale_a = a
    num_b, den_b, scale_b = b
    scale_a = torch.where(den_a > 0, scale_a, float("-inf"))
    scale_b = torch.where(den_b > 0, scale_b, float("-inf"))
    top = torch.maximum(scale_a, scale_b)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w_a, w_b = torch.exp(scale_a - top), torch.exp(scale_b - top)
    return w_a[..., None] * num_a + w_b[..., None] * num_b, w_a * den_a + w_b * den_b, top


def naive_sparse_mask(old: Tensor, scores: Tensor, size: int) -> Tensor:
    """From scratch: which old keys each query keeps exact. old [T, T] (or [B, T, T]) bool, key
    j has left query i's window; scores [B, T] per position -> [B, T, T] bool, the `size` best
    old keys of each query (higher score, then the newer key)."""
    seq_len = scores.shape[1]
    pos = torch.arange(seq_len, device=scores.device).expand_as(scores)
    above = outranks(scores, pos).to(scores.dtype)  # [B, T(a), T(b)]
    old = old.expand(scores.shape[0], -1, -1).to(scores.dtype)  # [B, T(query), T(key)]
    ahead = old @ above  # [B, query, b]: old keys of the query that rank above b
    return old.bool() & (ahead < size)
