"""One decode step of causal expressive attention: fold the new key into the state, then read out.

O(F Dv) per head and token with F = D(D+1)/2, whatever the context length.
"""

from __future__ import annotations

import math

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


def ea_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: EAState | None,
    *,
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, EAState]:
    """One token per sequence.

    q: [B, Hq, 1, D], k: [B, Hkv, 1, D], v: [B, Hkv, 1, Dv], state: the state before this token
    (None = empty) -> y [B, Hq, 1, Dv] (q's dtype) and the state after it. The token attends to
    itself (s <= t), so its key enters the state before the readout. `state` is not modified.
    """
    batch, num_q_heads, num_kv_heads, seq_len, head_dim, v_dim = check_ea_inputs(
        q, k, v, state, eps
    )
    if seq_len != 1:
        raise ValueError(f"ea_step takes one token per sequence (T = 1), got T = {seq_len}")
    dtype = compute_dtype(q)
    start = initial_state(state, batch, num_kv_heads, head_dim, v_dim, dtype, q.device)
    phi_k = ea_features(k.to(dtype))  # [B, Hkv, 1, F]
    S = start.S + phi_k.transpose(-1, -2) @ v.to(dtype)
    z = start.z + phi_k[:, :, 0]
    group = num_q_heads // num_kv_heads
    qs = (q.to(dtype) / math.sqrt(head_dim)).reshape(batch, num_kv_heads, group, 1, head_dim)
    num, den = state_readout(ea_features(qs), S, z)
    y = (num / (eps + den)[..., None]).reshape(batch, num_q_heads, 1, v_dim)
    return y.to(q.dtype), EAState(S=S, z=z, num_tokens=start.num_tokens + 1)
