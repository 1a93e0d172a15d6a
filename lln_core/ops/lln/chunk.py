"""Chunked causal LLN attention (prefill), stable in float32 to millions of tokens.

Per chunk c (DESIGN.md section 2): M_c is the running per-dimension max of beta k up to the end
of the chunk; keys become k~ = exp(beta k - M_c) <= 1; queries q~ = exp(alpha q + M_c - W_t)
with W_t = max_d(alpha q_t + M_c) so that q~ <= 1. The carried state enters through
exp(alpha q + M_{c-1} - W_t), also <= 1. The intra-chunk part is a masked q~ k~^T, so the work
is matrix products: O(T C D + T D Dv).

Using the chunk's max instead of each token's own running max is exact, but a key far larger
than everything before it (a spike) makes the earlier queries of its chunk lose all their
weight to underflow. Those rare rows are detected (denominator below TINY) and recomputed with
their own running max in log space, so the result stays exact whatever the keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lln_core.ops.common import (
    check_qkv,
    compute_dtype,
    count_tokens,
    exp_ftz,
    feature_logits,
    finite_or_zero,
    group_queries,
    ungroup,
    valid_tokens,
)
from lln_core.state import LLNState

# Rows whose denominator falls below this lost their dominant term to underflow.
TINY = 1e-20
# Long inputs go through in segments: bounded memory, and intermediates that stay in cache
# (measured: 64K-token prefill 2x faster than with 16K segments).
SEGMENT_TOKENS = 4096


@dataclass
class LLNParts:
    """Unnormalised LLN output: the true sums are exp(log_scale) * num and exp(log_scale) * den.

    num: [B, Hkv, G, T, Dv], den and log_scale: [B, Hkv, G, T]. den == 0 means no key is visible.
    """

    num: Tensor
    den: Tensor
    log_scale: Tensor

    def normalised(self) -> Tensor:
        den = self.den[..., None]
        return torch.where(den > 0, self.num / den.clamp_min(TINY), torch.zeros_like(self.num))


def lln_chunk_parts(
    aq: Tensor, b: Tensor, v: Tensor, state: LLNState, chunk_size: int
) -> tuple[LLNParts, Tensor, Tensor, Tensor]:
    """Chunked LLN on scaled inputs; keys with b = -inf are ignored.

    aq = alpha q: [B, Hkv, G, T, D]; b = beta k: [B, Hkv, T, D]; v: [B, Hkv, T, Dv].
    Returns the parts and the new (S, z, m).
    """
    _check_chunk_size(chunk_size)
    seq_len = aq.shape[3]
    num_chunks = max(1, math.ceil(seq_len / chunk_size))
    pad = num_chunks * chunk_size - seq_len
    aq = _chunks(F.pad(aq, (0, 0, 0, pad)), num_chunks)  # [B, H, G, N, C, D]
    b = _chunks(F.pad(b, (0, 0, 0, pad), value=float("-inf")), num_chunks)  # [B, H, N, C, D]
    v = _chunks(F.pad(v, (0, 0, 0, pad)), num_chunks)  # [B, H, N, C, Dv]

    m_in = state.m.to(b.dtype)
    running = torch.maximum(b.amax(dim=3), m_in[:, :, None]).cummax(dim=2).values  # [B,H,N,D]
    m_prev = torch.cat([m_in[:, :, None], running[:, :, :-1]], dim=2)
    ref = finite_or_zero(running)
    k_t = exp_ftz(b - ref[:, :, :, None])  # [B, H, N, C, D], <= 1

    S_in, z_in, S, z = _scan_states(k_t, v, m_prev, ref, state)

    # the G query heads of a KV head stacked per chunk, [B, H, N, G C, D]: every product below
    # is then one batched matmul over (B, H, N), where einsum over [B, H, G, N, C, D] copied its
    # operands into matmul layouts (1 s of a 4K-token prefill of the default model)
    batch, heads, group = aq.shape[:3]
    aq = aq.transpose(2, 3).reshape(batch, heads, num_chunks, group * chunk_size, -1)
    inplace = not aq.requires_grad  # the exponentials' inputs below are temporaries
    w = aq + ref[:, :, :, None, :]
    log_scale = w.amax(dim=-1)  # [B, H, N, G C]
    q_intra = exp_ftz(w.sub_(log_scale[..., None]) if inplace else w - log_scale[..., None],
                      inplace=inplace)  # fmt: skip
    q_inter = exp_ftz(aq + (m_prev[:, :, :, None, :] - log_scale[..., None]), inplace=inplace)

    causal = torch.ones(chunk_size, chunk_size, dtype=aq.dtype, device=aq.device).tril()
    scores = (q_intra @ k_t.transpose(-1, -2)).mul_(causal.repeat(group, 1))  # [B,H,N,GC,C]
    num = torch.baddbmm((q_inter @ S_in).flatten(0, 2), scores.flatten(0, 2), v.flatten(0, 2)).view(
        *scores.shape[:-1], -1
    )
    den = scores.sum(-1) + (q_inter @ z_in[..., None])[..., 0]

    def by_head(x: Tensor) -> Tensor:  # [B, H, N, G C, ...] -> [B, H, G, N, C, ...]
        return x.view(batch, heads, num_chunks, group, chunk_size, *x.shape[4:]).transpose(2, 3)

    aq = by_head(aq)
    parts = LLNParts(by_head(num), by_head(den), by_head(log_scale))
    _recompute_underflowed_rows(parts, aq, b, v, m_prev, S_in, z_in)
    parts = LLNParts(*(_unchunk(x, seq_len) for x in (parts.num, parts.den, parts.log_scale)))
    return parts, S, z, running[:, :, -1]


def lln_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float | Tensor,
    beta: float | Tensor,
    *,
    state: LLNState | None = None,
    chunk_size: int = 64,
    lengths: Tensor | None = None,
) -> tuple[Tensor, LLNState]:
    """Causal LLN attention over T new tokens, continuing from `state`.

    q: [B, Hq, T, D]; k: [B, Hkv, T, D]; v: [B, Hkv, T, Dv]; alpha: scalar, [Hkv] or [Hq];
    beta: scalar or [Hkv]. lengths [B] (optional): row b holds lengths[b] real tokens followed
    by padding, which never enters the state. Returns y [B, Hq, T, Dv] (q's dtype; padded rows
    unspecified but finite) and the state after the last real token (float32, float64 for
    float64 inputs).
    """
    batch, num_kv_heads, group, seq_len = check_qkv(q, k, v)
    _check_chunk_size(chunk_size)
    dtype = compute_dtype(q)
    if state is None:
        state = LLNState.empty(batch, num_kv_heads, q.shape[-1], v.shape[-1], dtype, q.device)
    qg = group_queries(q, num_kv_heads, dtype)
    aq = feature_logits(alpha, qg, num_kv_heads, group, query_side=True)
    b = feature_logits(beta, k.to(dtype), num_kv_heads, group, query_side=False)
    v = v.to(dtype)
    valid = valid_tokens(lengths, batch, seq_len, q.device)
    if valid is not None:
        b, v = mask_padding(b, v, valid)
    segment = chunk_size * max(1, SEGMENT_TOKENS // chunk_size)
    outputs, carried = [], state
    for start in range(0, max(seq_len, 1), segment):
        end = start + segment
        parts, S, z, m = lln_chunk_parts(
            aq[:, :, :, start:end], b[:, :, start:end], v[:, :, start:end], carried, chunk_size
        )
        outputs.append(parts.normalised())
        carried = LLNState(S, z, m, carried.num_tokens)
    new_state = LLNState(
        S=carried.S.to(state.S.dtype),
        z=carried.z.to(state.z.dtype),
        m=carried.m.to(state.m.dtype),
        num_tokens=state.num_tokens + count_tokens(valid, seq_len),
        local=state.local,
    )
    return ungroup(torch.cat(outputs, dim=3)).to(q.dtype), new_state


def mask_padding(b: Tensor, v: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Padding keys get b = -inf (weight 0) and zero values. b: [B, H, T, D], valid: [B, T]."""
    mask = valid[:, None, :, None]
    return torch.where(mask, b, float("-inf")), torch.where(mask, v, 0.0)


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _chunks(x: Tensor, num_chunks: int) -> Tensor:
    """`[..., N*C, D] -> [..., N, C, D]`."""
    return x.reshape(*x.shape[:-2], num_chunks, -1, x.shape[-1])


def _unchunk(x: Tensor, seq_len: int) -> Tensor:
    """`[B, H, G, N, C, ...] -> [B, H, G, T, ...]`, dropping the padding."""
    return x.flatten(3, 4)[:, :, :, :seq_len]


def _scan_states(
    k_t: Tensor, v: Tensor, m_prev: Tensor, ref: Tensor, state: LLNState
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """State entering each chunk (relative to m_prev) and the final state (relative to ref[-1]).

    The only sequential part: S_{c+1} = exp(m_prev_c - M_c) S_c + k~_c^T V_c.
    """
    dS = torch.einsum("bhncd,bhnce->bhnde", k_t, v)
    dz = k_t.sum(dim=3)
    decay = torch.exp(m_prev - ref)  # 0 where nothing was carried (m_prev = -inf)
    S = state.S.to(v.dtype)
    z = state.z.to(v.dtype)
    S_in, z_in = [], []
    for c in range(k_t.shape[2]):
        S_in.append(S)
        z_in.append(z)
        S = S * decay[:, :, c, :, None] + dS[:, :, c]
        z = z * decay[:, :, c] + dz[:, :, c]
    return torch.stack(S_in, dim=2), torch.stack(z_in, dim=2), S, z


def _recompute_underflowed_rows(
    parts: LLNParts,
    aq: Tensor,
    b: Tensor,
    v: Tensor,
    m_prev: Tensor,
    S_in: Tensor,
    z_in: Tensor,
) -> None:
    """Redo rows whose weights underflowed, with each row's own running max (replaces the
    tensors of `parts`)."""
    has_key = torch.isfinite(b[..., 0]).cumsum(dim=-1) > 0  # [B, H, N, C]
    has_key = has_key | torch.isfinite(m_prev[..., :1])  # the carried state holds keys
    rows = (parts.den < TINY) & has_key[:, :, None]
    if not bool(rows.any()):
        return
    bi, hi, gi, ni, ci = rows.nonzero(as_tuple=True)
    chunk_size = b.shape[3]
    aq_r = aq[bi, hi, gi, ni, ci]  # [R, D]
    visible = torch.arange(chunk_size, device=b.device)[None] <= ci[:, None]  # [R, C]
    b_r = torch.where(visible[..., None], b[bi, hi, ni], float("-inf"))  # [R, C, D]
    m_r = m_prev[bi, hi, ni]  # [R, D]
    running = torch.maximum(m_r, b_r.amax(dim=1))
    log_scale = (aq_r + finite_or_zero(running)).amax(dim=-1)  # [R]
    weights = torch.exp(aq_r[:, None] + b_r - log_scale[:, None, None]).sum(-1)  # [R, C]
    q_inter = torch.exp(aq_r + m_r - log_scale[:, None])
    num = (weights[:, None] @ v[bi, hi, ni])[:, 0] + (q_inter[:, None] @ S_in[bi, hi, ni])[:, 0]
    den = weights.sum(-1) + (q_inter * z_in[bi, hi, ni]).sum(-1)
    # out of place, so that autograd (distillation) can still differentiate through the rest
    index = (bi, hi, gi, ni, ci)
    parts.num = parts.num.index_put(index, num)
    parts.den = parts.den.index_put(index, den)
    parts.log_scale = parts.log_scale.index_put(index, log_scale)
