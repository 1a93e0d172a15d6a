"""One decode step of causal LLN attention: the recurrence with a per-dimension running max.

    b = beta k_t;  m' = max(m, b);  S~ = exp(m - m') S~ + exp(b - m') v_t^T;  z~ likewise
    w = alpha q_t + m';  q~ = exp(w - max(w));  y_t = q~^T S~ / q~^T z~

Every factor is <= 1 and the dominant term of the denominator is 1 (DESIGN.md section 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lln_core.ops.common import (
    check_qkv,
    compute_dtype,
    feature_logits,
    finite_or_zero,
    group_queries,
    ungroup,
)
from lln_core.ops.lln.chunk import LLNParts
from lln_core.state import LLNState


def lln_step_parts(
    aq: Tensor, b: Tensor, v: Tensor, state: LLNState
) -> tuple[LLNParts, Tensor, Tensor, Tensor]:
    """aq = alpha q [B, Hkv, G, D]; b = beta k [B, Hkv, D] (-inf: no key); v [B, Hkv, Dv].

    Returns the unnormalised output (num [B, Hkv, G, Dv], den and log_scale [B, Hkv, G]) and the
    new (S, z, m).
    """
    m_old = state.m.to(b.dtype)
    m = torch.maximum(m_old, b)
    ref = finite_or_zero(m)
    decay = torch.exp(m_old - ref)
    k_t = torch.exp(b - ref)
    S = torch.addcmul(state.S.to(b.dtype) * decay[..., None], k_t[..., None], v[:, :, None, :])
    z = torch.addcmul(k_t, state.z.to(b.dtype), decay)

    w = aq + ref[:, :, None]  # [B, H, G, D]
    log_scale = w.amax(dim=-1, keepdim=True)  # [B, H, G, 1]
    q_t = torch.exp(w - log_scale)
    num = q_t @ S  # [B, H, G, Dv]: the G query heads of a group in one product
    den = q_t @ z[..., None]  # [B, H, G, 1]
    return LLNParts(num, den[..., 0], log_scale[..., 0]), S, z, m


def lln_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float | Tensor,
    beta: float | Tensor,
    state: LLNState,
) -> tuple[Tensor, LLNState]:
    """One token per sequence. q: [B, Hq, 1, D]; k: [B, Hkv, 1, D]; v: [B, Hkv, 1, Dv].

    Returns y [B, Hq, 1, Dv] and the new state.
    """
    _batch, num_kv_heads, group, seq_len = check_qkv(q, k, v)
    if seq_len != 1:
        raise ValueError(f"lln_step takes one token per sequence (T = 1), got T = {seq_len}")
    dtype = compute_dtype(q)
    qg = group_queries(q, num_kv_heads, dtype)
    aq = feature_logits(alpha, qg, num_kv_heads, group, query_side=True)[:, :, :, 0]
    b = feature_logits(beta, k.to(dtype), num_kv_heads, group, query_side=False)[:, :, 0]
    parts, S, z, m = lln_step_parts(aq, b, v.to(dtype)[:, :, 0], state)
    new_state = LLNState(
        S=S.to(state.S.dtype),
        z=z.to(state.z.dtype),
        m=m.to(state.m.dtype),
        num_tokens=state.num_tokens + 1,
        local=state.local,
    )
    return ungroup(parts.normalised()[:, :, :, None]).to(q.dtype), new_state
