"""Quadratic reference for causal LLN attention: the formula, written plainly, float64-capable."""

from __future__ import annotations

import torch
from torch import Tensor

from lln_core.ops.common import (
    check_qkv,
    compute_dtype,
    feature_logits,
    finite_or_zero,
    ungroup,
)
from lln_core.state import LLNState


def naive_lln_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float | Tensor,
    beta: float | Tensor,
    *,
    state: LLNState | None = None,
) -> tuple[Tensor, LLNState]:
    """y_t = sum_{s<=t} w_ts v_s / sum_{s<=t} w_ts with w_ts = exp(alpha q_t) . exp(beta k_s).

    q: [B, Hq, T, D], k: [B, Hkv, T, D], v: [B, Hkv, T, Dv]. The carried state (keys before this
    call) enters as one more term of both sums. One constant shift per dimension (the max of
    beta k over all keys, which is also the returned state's m) keeps exp finite; it cancels in
    the ratio, so this is the exact formula.
    """
    batch, num_kv_heads, group, seq_len = check_qkv(q, k, v)
    dtype = compute_dtype(q)
    if state is None:
        state = LLNState.empty(batch, num_kv_heads, q.shape[-1], v.shape[-1], dtype, q.device)
    qg = q.to(dtype).reshape(batch, num_kv_heads, group, seq_len, q.shape[-1])
    aq = feature_logits(alpha, qg, num_kv_heads, group, query_side=True)
    b = feature_logits(beta, k.to(dtype), num_kv_heads, group, query_side=False)
    vv = v.to(dtype)

    m = torch.maximum(state.m.to(dtype), b.amax(dim=2))  # [B, Hkv, D]
    shift = finite_or_zero(m)
    phi_k = torch.exp(b - shift[:, :, None])  # [B, Hkv, T, D]
    carried = torch.exp(state.m.to(dtype) - shift)  # rescales the old state to the new shift
    S0 = state.S.to(dtype) * carried[..., None]
    z0 = state.z.to(dtype) * carried

    logits = aq + shift[:, :, None, None]  # log phi_q, shifted by the keys' shift
    phi_q = torch.exp(logits - logits.amax(dim=-1, keepdim=True))  # row scale cancels
    scores = torch.einsum("bhgtd,bhsd->bhgts", phi_q, phi_k)
    scores = scores * torch.ones(seq_len, seq_len, dtype=dtype, device=q.device).tril()
    num = scores @ vv[:, :, None] + torch.einsum("bhgtd,bhde->bhgte", phi_q, S0)
    den = scores.sum(-1) + torch.einsum("bhgtd,bhd->bhgt", phi_q, z0)
    y = torch.where(den[..., None] > 0, num / den[..., None], torch.zeros_like(num))

    new_state = LLNState(
        S=(S0 + phi_k.transpose(-1, -2) @ vv).to(state.S.dtype),
        z=(z0 + phi_k.sum(dim=2)).to(state.z.dtype),
        m=m.to(state.m.dtype),
        num_tokens=state.num_tokens + seq_len,
        local=state.local,
    )
    return ungroup(y).to(q.dtype), new_state
