"""Quadratic reference for causal expressive attention: the full masked (q k^T / sqrt(D))^2.

O(T^2) time and memory; meant for checking the chunked and recurrent forms in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lln_core.ops.common import compute_dtype
from lln_core.ops.ea.chunk import (
    DEFAULT_EPS,
    check_ea_inputs,
    ea_features,
    initial_state,
    state_readout,
)
from lln_core.state import EAState


def naive_ea_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    eps: float = DEFAULT_EPS,
    state: EAState | None = None,
) -> tuple[Tensor, EAState]:
    """y_t = sum_{s<=t} s_ts^2 v_s / (eps + sum_{u<=t} s_tu^2), s_ts = q_t.k_s / sqrt(D).

    q: [B, Hq, T, D], k: [B, Hkv, T, D], v: [B, Hkv, T, Dv] -> y [B, Hq, T, Dv] (q's dtype) and
    the state after the last token. Keys of an initial `state` (tokens before these T) are only
    available as sums of phi(k), so they enter through phi(q / sqrt(D)), which is exact.
    """
    batch, num_q_heads, num_kv_heads, seq_len, head_dim, v_dim = check_ea_inputs(
        q, k, v, state, eps
    )
    dtype = compute_dtype(q)
    group = num_q_heads // num_kv_heads
    qs = (q.to(dtype) / math.sqrt(head_dim)).reshape(batch, num_kv_heads, group, seq_len, head_dim)
    kf, vf = k.to(dtype), v.to(dtype)

    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    scores = (qs @ kf[:, :, None].transpose(-1, -2)).square()  # [B, Hkv, G, T, T]
    scores = scores.masked_fill(~mask, 0.0)
    num = scores @ vf[:, :, None]
    den = scores.sum(-1)
    if state is not None:
        start = initial_state(state, batch, num_kv_heads, head_dim, v_dim, dtype, q.device)
        past_num, past_den = state_readout(ea_features(qs), start.S, start.z)
        num, den = num + past_num, den + past_den
    y = (num / (eps + den)[..., None]).reshape(batch, num_q_heads, seq_len, v_dim)
    return y.to(q.dtype), _final_state(kf, vf, state, dtype)


def _final_state(k: Tensor, v: Tensor, state: EAState | None, dtype: torch.dtype) -> EAState:
    """State after the last token: start state plus sum_s phi(k_s) v_s^T and sum_s phi(k_s).

    k: [B, Hkv, T, D], v: [B, Hkv, T, Dv] (compute dtype)."""
    batch, num_kv_heads, seq_len, head_dim = k.shape
    start = initial_state(state, batch, num_kv_heads, head_dim, v.shape[-1], dtype, k.device)
    phi_k = ea_features(k)  # [B, Hkv, T, F]
    return EAState(
        S=start.S + phi_k.transpose(-1, -2) @ v,
        z=start.z + phi_k.sum(-2),
        num_tokens=start.num_tokens + seq_len,
    )
