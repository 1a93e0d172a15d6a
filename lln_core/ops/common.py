"""Shape checks and broadcasting shared by the attention kernels."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[int, int, int, int]:
    """Check q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv]; return (B, Hkv, G, T)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-d [B, H, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    batch, num_q_heads, seq_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[2] != seq_len or k.shape[3] != head_dim:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v {tuple(v.shape)} does not match k {tuple(k.shape)}")
    num_kv_heads = k.shape[1]
    if num_kv_heads == 0 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"query heads ({num_q_heads}) must be a multiple of KV heads ({num_kv_heads})"
        )
    return batch, num_kv_heads, num_q_heads // num_kv_heads, seq_len


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (references); everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def group_queries(q: Tensor, num_kv_heads: int, dtype: torch.dtype) -> Tensor:
    """`[B, Hq, T, D] -> [B, Hkv, G, T, D]`: the G query heads that share one KV head."""
    batch, num_q_heads, seq_len, head_dim = q.shape
    return q.to(dtype).reshape(batch, num_kv_heads, num_q_heads // num_kv_heads, seq_len, head_dim)


def ungroup(y: Tensor) -> Tensor:
    """`[B, Hkv, G, T, ...] -> [B, Hq, T, ...]`."""
    return y.flatten(1, 2)


def per_head(
    value: float | Tensor, num_kv_heads: int, group: int, like: Tensor, *, query_side: bool
) -> Tensor:
    """Broadcastable per-head parameter.

    `value` is a scalar, `[Hkv]` or (query side only) `[Hq]`. Returns `[1, Hkv, G, 1, 1]` for the
    query side (grouped queries `[B, Hkv, G, T, D]`) and `[1, Hkv, 1, 1]` for the key side.
    """
    if isinstance(value, Tensor):
        t = value.to(like.device, like.dtype)
    else:  # filled on the device: no host-to-device copy (a CUDA graph can capture it)
        t = torch.full((), value, dtype=like.dtype, device=like.device)
    if t.dim() == 1 and t.numel() == num_kv_heads:  # the common case, one view
        return t.view(1, num_kv_heads, 1, 1, 1) if query_side else t.view(1, num_kv_heads, 1, 1)
    if t.dim() == 0:
        t = t.expand(num_kv_heads)
    if t.dim() != 1 or t.numel() not in (num_kv_heads, num_kv_heads * group):
        raise ValueError(
            f"per-head parameter must be a scalar or have {num_kv_heads} (KV heads)"
            + (f" or {num_kv_heads * group} (query heads)" if query_side else "")
            + f" entries; got shape {tuple(t.shape)}"
        )
    if query_side:
        return (
            t.reshape(num_kv_heads, -1)
            .expand(num_kv_heads, group)
            .reshape(1, num_kv_heads, group, 1, 1)
        )
    if t.numel() != num_kv_heads:
        raise ValueError(f"key-side parameter needs {num_kv_heads} entries, got {t.numel()}")
    return t.reshape(1, num_kv_heads, 1, 1)


def feature_logits(
    scale: float | Tensor, x: Tensor, num_kv_heads: int, group: int, *, query_side: bool
) -> Tensor:
    """The exponent of LLN's features: alpha q (query side) or beta k (key side).

    `scale` is what `per_head` takes (the paper's scalar per head), or a per-head linear map
    `[Hq, D, D]` (query side) / `[Hkv, D, D]` (key side) applied as x @ W^T: the learned feature
    transform before the exponential. x: grouped queries `[B, Hkv, G, T, D]` or keys
    `[B, Hkv, T, D]`.
    """
    if not isinstance(scale, Tensor) or scale.dim() < 3:
        return per_head(scale, num_kv_heads, group, x, query_side=query_side) * x
    heads = num_kv_heads * group if query_side else num_kv_heads
    dim = x.shape[-1]
    if scale.shape != (heads, dim, dim):
        side = "query" if query_side else "key"
        raise ValueError(
            f"{side}-side feature map must be [{heads}, {dim}, {dim}], got {tuple(scale.shape)}"
        )
    w = scale.to(x.dtype)
    if query_side:
        return torch.einsum("bhgtd,hged->bhgte", x, w.view(num_kv_heads, group, dim, dim))
    return torch.einsum("bhtd,hed->bhte", x, w)


def finite_or_zero(x: Tensor) -> Tensor:
    """Replace -inf (no key seen yet) by 0 so that differences with it stay defined."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def exp_ftz(x: Tensor, *, inplace: bool = False) -> Tensor:
    """exp(x) with results below the smallest normal float flushed to zero.

    x86's vectorised exp takes a slow path when its result underflows (measured here: 15-40x
    slower on such inputs), and LLN features exp(alpha q - max) span ~100 nats, as do masked or
    far-off softmax logits. Clamping first keeps every element on the fast path; the flush is
    what FTZ (`enable_flush_denormal`) does to those results anyway. `inplace` reuses x's memory
    (only where autograd does not need x).
    """
    floor = math.floor(math.log(torch.finfo(x.dtype).tiny)) + 1  # -87 (float32), -708 (float64)
    underflow = x < floor
    if inplace:
        return x.clamp_(min=floor).exp_().masked_fill_(underflow, 0.0)
    return torch.where(underflow, 0.0, torch.exp(x.clamp(min=floor)))


def round_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x rounded to the values `dtype` holds, kept in x's dtype (round to nearest even).

    float32 -> bfloat16 is done on the bits: torch.compile drops a `.to(bfloat16).to(float32)`
    round trip as a no-op, and then a compiled decode step would compute with unrounded keys
    while eager prefill computes with rounded ones (NaN and inf are not expected here)."""
    if dtype == x.dtype:
        return x
    if x.dtype == torch.float32 and dtype == torch.bfloat16:
        bits = x.view(torch.int32)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -0x10000
        return bits.view(torch.float32)
    return x.to(dtype).to(x.dtype)


def valid_tokens(lengths: Tensor | None, batch: int, seq_len: int, device) -> Tensor | None:
    """`[B, T]` bool, True for the first lengths[b] tokens of row b (right padding), or None."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.shape != (batch,) or bool((lengths < 0).any()) or bool((lengths > seq_len).any()):
        raise ValueError(f"lengths must be [B] = [{batch}] with values in [0, {seq_len}]")
    return torch.arange(seq_len, device=device)[None] < lengths[:, None]


def count_tokens(valid: Tensor | None, seq_len: int) -> Tensor | int:
    """Tokens each row adds to its state: T, or the per-row valid count."""
    return seq_len if valid is None else valid.sum(dim=1)


def enable_flush_denormal() -> bool:
    """Flush subnormal floats to zero on CPU (FTZ/DAZ); returns whether the CPU supports it.

    States and features are kept relative to a running max, so entries far below it (e^-87 and
    less) are subnormal floats: negligible against the max term (1), but x86 CPUs take a slow
    path on them (measured here: model prefill 16 -> 338 tokens/s). Flushing them to zero
    changes results by less than float32 resolution.
    """
    return torch.set_flush_denormal(True)


def fused_softmax_fits(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether `fused_softmax_parts` can take these: PyTorch's fused CPU flash kernel takes one
    dtype and equal key and value widths, and has no backward with a mask."""
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype
        and q.dtype in (torch.float32, torch.float64)
        and q.shape[-1] == v.shape[-1]
        and not grad
    )


def fused_softmax_parts(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, seen: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Unnormalised softmax parts (num, den, log_scale) of q [B, H, Lq, D] over k, v [B, H, Lk,
    D] with an additive mask (0 or -inf, broadcastable to [B, H, Lq, Lk]), in one fused kernel:
    the logits stay in cache in blocks instead of a pass over a [Lq, Lk] tensor per elementwise
    step. The kernel returns the normalised output and its log-sum-exp, i.e. num with den = 1;
    seen [B, H or 1, Lq] bool: whether the query sees any key (den = 0 where not)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, attn_mask=mask, scale=scale
    )
    den = seen.to(q.dtype).expand(lse.shape)
    return out, den, torch.where(seen, lse, 0.0)


def slot_logits(q: Tensor, k: Tensor) -> Tensor:
    """Decode queries q [..., G, D] against stored keys k [..., N, D] -> [..., G, N] in q's
    dtype. Keys stored narrower (bfloat16) are read as they are when compiled: inductor fuses
    the widening into the reduction, where a matmul would need a widened copy of every key in
    every step (measured 53 vs 97 us for 912 keys of 3 KV heads at batch 1)."""
    if k.dtype != q.dtype and torch.compiler.is_compiling():
        return (q.unsqueeze(-2) * k.unsqueeze(-3).to(q.dtype)).sum(-1)
    return q @ k.to(q.dtype).transpose(-1, -2)


def slot_values(weights: Tensor, v: Tensor) -> Tensor:
    """weights [..., G, N] over stored values v [..., N, Dv] -> [..., G, Dv], weights' dtype;
    narrower stored values as in `slot_logits`."""
    if v.dtype != weights.dtype and torch.compiler.is_compiling():
        return (weights.unsqueeze(-1) * v.unsqueeze(-3).to(weights.dtype)).sum(-2)
    return weights @ v.to(weights.dtype)
