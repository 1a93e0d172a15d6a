"""Chunked causal expressive attention (prefill), plus the feature map and checks shared by the
naive and recurrent forms.

Per chunk of C tokens, the keys of earlier chunks enter through the carried state and phi(q); the
keys of the chunk itself through the exact masked (q k^T / sqrt(D))^2, so no features are needed
inside a chunk. Cost O(T C D + T F Dv) with F = D(D+1)/2; the state never grows.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from lln_core.ops.common import compute_dtype, count_tokens, valid_tokens
from lln_core.state import EAState

DEFAULT_EPS = 1e-6


def num_ea_features(head_dim: int) -> int:
    """F = D(D+1)/2, the size of phi(x) for x in R^D."""
    return head_dim * (head_dim + 1) // 2


def ea_features(x: Tensor) -> Tensor:
    """phi(x): the D(D+1)/2 distinct entries of x (x) x, so that phi(q).phi(k) = (q.k)^2 exactly.

    x: [..., D] -> [..., D(D+1)/2]. Entry order is torch.triu_indices(D, D) (row-major over a <= b):
    x_a^2 on the diagonal, sqrt(2) x_a x_b off it. No 1/sqrt(D) inside: callers scale q first.
    """
    rows, cols, weight = _feature_index(x.shape[-1], x.dtype, x.device)
    return x[..., rows] * x[..., cols] * weight


@functools.lru_cache(maxsize=16)
def _feature_index(head_dim: int, dtype: torch.dtype, device: torch.device):
    """Index pairs and weights of phi, built once per (D, dtype, device)."""
    rows, cols = torch.triu_indices(head_dim, head_dim, device=device)
    # built in x's dtype: a float32 sqrt(2) would cost float64 inputs 8 digits
    weight = torch.full(rows.shape, math.sqrt(2.0), dtype=dtype, device=device)
    weight[rows == cols] = 1.0
    return rows, cols, weight


def check_ea_inputs(
    q: Tensor, k: Tensor, v: Tensor, state: EAState | None, eps: float
) -> tuple[int, int, int, int, int, int]:
    """Validate shapes; return (B, Hq, Hkv, T, D, Dv).

    q: [B, Hq, T, D], k: [B, Hkv, T, D], v: [B, Hkv, T, Dv], Hq a multiple of Hkv.
    state (optional): S [B, Hkv, F, Dv], z [B, Hkv, F], num_tokens [B].
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{name} must be [B, H, T, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    batch, num_q_heads, seq_len, head_dim = q.shape
    _, num_kv_heads, _, v_dim = v.shape
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ in [B, Hkv, T]")
    if (k.shape[0], k.shape[2], k.shape[3]) != (batch, seq_len, head_dim):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in B, T or D")
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"Hq={num_q_heads} must be a positive multiple of Hkv={num_kv_heads}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if state is not None:
        _check_state(state, batch, num_kv_heads, head_dim, v_dim)
    return batch, num_q_heads, num_kv_heads, seq_len, head_dim, v_dim


def _check_state(state: EAState, batch: int, num_kv_heads: int, head_dim: int, v_dim: int) -> None:
    features = num_ea_features(head_dim)
    expected = {
        "S": (batch, num_kv_heads, features, v_dim),
        "z": (batch, num_kv_heads, features),
        "num_tokens": (batch,),
    }
    for name, shape in expected.items():
        got = tuple(getattr(state, name).shape)
        if got != shape:
            raise ValueError(f"state.{name} must have shape {shape}, got {got}")


def initial_state(
    state: EAState | None,
    batch: int,
    num_kv_heads: int,
    head_dim: int,
    v_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> EAState:
    """The given state in the compute dtype (never modified in place), or a fresh empty one."""
    if state is None:
        return EAState.empty(batch, num_kv_heads, head_dim, v_dim, dtype=dtype, device=device)
    return EAState(
        S=state.S.to(device=device, dtype=dtype),
        z=state.z.to(device=device, dtype=dtype),
        num_tokens=state.num_tokens.to(device),
    )


def state_readout(phi_q: Tensor, S: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Numerator and denominator that the keys held in a state give to queries.

    phi_q: [B, Hkv, G, T, F], S: [B, Hkv, F, Dv], z: [B, Hkv, F]
    -> num [B, Hkv, G, T, Dv], den [B, Hkv, G, T].
    den = sum_s (q.k_s)^2 >= 0, but phi_q has signed entries, so rounding can push it below zero
    when q is nearly orthogonal to every key; clamp it.
    """
    batch, num_kv, group, seq_len, features = phi_q.shape
    flat = phi_q.reshape(batch, num_kv, group * seq_len, features)  # no copy of S per query head
    num = (flat @ S).reshape(batch, num_kv, group, seq_len, S.shape[-1])
    den = (flat @ z[..., None]).reshape(batch, num_kv, group, seq_len).clamp_min(0.0)
    return num, den


def _chunk_step(
    qc: Tensor, kc: Tensor, vc: Tensor, S: Tensor, z: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk. qc: [B, Hkv, G, C, D] (already times 1/sqrt(D)), kc: [B, Hkv, C, D],
    vc: [B, Hkv, C, Dv] -> y [B, Hkv, G, C, Dv] and the state (S, z) after the chunk."""
    num, den = state_readout(ea_features(qc), S, z)
    scores = torch.tril(qc @ kc[:, :, None].transpose(-1, -2)).square()  # [B, Hkv, G, C, C]
    num = num + scores @ vc[:, :, None]
    den = den + scores.sum(-1)
    y = num / (eps + den)[..., None]
    phi_k = ea_features(kc)  # [B, Hkv, C, F]
    return y, S + phi_k.transpose(-1, -2) @ vc, z + phi_k.sum(-2)


def ea_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    eps: float = DEFAULT_EPS,
    state: EAState | None = None,
    chunk_size: int = 64,
    lengths: Tensor | None = None,
) -> tuple[Tensor, EAState]:
    """Causal expressive attention over T new tokens, continuing from `state`.

    y_t = sum_{s<=t} s_ts^2 v_s / (eps + sum_{u<=t} s_tu^2), s_ts = q_t.k_s / sqrt(D), where the
    sums also run over the tokens already folded into `state`.
    q: [B, Hq, T, D], k: [B, Hkv, T, D], v: [B, Hkv, T, Dv] -> y [B, Hq, T, Dv] (q's dtype) and
    the state after the last token (float32, or float64 for float64 q). Splitting a prefill
    anywhere and passing the state along gives the same result as one call. lengths [B]
    (optional): right padding; padded keys are zeroed, so phi(k) = 0 adds nothing.
    """
    batch, num_q_heads, num_kv_heads, seq_len, head_dim, v_dim = check_ea_inputs(
        q, k, v, state, eps
    )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = compute_dtype(q)
    start_state = initial_state(state, batch, num_kv_heads, head_dim, v_dim, dtype, q.device)
    S, z = start_state.S, start_state.z
    group = num_q_heads // num_kv_heads
    qs = (q.to(dtype) / math.sqrt(head_dim)).reshape(batch, num_kv_heads, group, seq_len, head_dim)
    kf, vf = k.to(dtype), v.to(dtype)
    valid = valid_tokens(lengths, batch, seq_len, q.device)
    if valid is not None:
        kf, vf = kf * valid[:, None, :, None], vf * valid[:, None, :, None]
    outputs = [qs.new_zeros(batch, num_kv_heads, group, 0, v_dim)]
    for start in range(0, seq_len, chunk_size):
        end = min(seq_len, start + chunk_size)
        chunk = slice(start, end)
        y, S, z = _chunk_step(qs[..., chunk, :], kf[..., chunk, :], vf[..., chunk, :], S, z, eps)
        outputs.append(y)
    y = torch.cat(outputs, dim=-2).reshape(batch, num_q_heads, seq_len, v_dim)
    added = count_tokens(valid, seq_len)
    return y.to(q.dtype), EAState(S=S, z=z, num_tokens=start_state.num_tokens + added)
