"""Moment matching: LLN's alpha, beta from the std of q and k, and the refit of its constants.

What the paper and its reference code say (Nahshan, Kampeas, Haleva, arXiv 2311.13541; code at
github ynahshan/linear-lognormal-attention, `lln/lln_attention.py`, `LLNAttention.forward`):

- sigma_q = q.std(), sigma_k = k.std() over all entries of the *raw* q, k (no 1/sqrt(d) folded
  in). Softmax uses q k^T / sqrt(d), so a score has variance sigma_q^2 sigma_k^2 (d products
  divided by d): that is Proposition 3.1's Var[log P_SA] ~ sigma_q^2 sigma_k^2.
- LLN scores are exp(alpha q) . exp(beta k), no 1/sqrt(d). Its log-variance is modelled as
  a (alpha^2 sigma_q^2 + beta^2 sigma_k^2) + b; setting alpha^2 sigma_q^2 = beta^2 sigma_k^2 = s2
  and equating with sigma_q^2 sigma_k^2 gives s2 = (sigma_q^2 sigma_k^2 - b) / (2a),
  alpha = sqrt(s2) / sigma_q, beta = sqrt(s2) / sigma_k (code: `sig_tild`).
- a = 0.14855178144710912, b = -0.35487039130661086, hard-coded, fitted for d = 64. Neither the
  code nor any stored copy of the paper we could reach says how (its body was not reachable).

How we refit them (`fit_lln_log_variance`), and the choices that were ours:

- x = alpha^2 sigma_q^2 + beta^2 sigma_k^2 is the variance of alpha q_d + beta k_d. Only x and the
  split matter, so we draw q, k ~ N(0, 1) and set alpha = beta = sqrt(x / 2): the split that moment
  matching uses. (The row-normalised LLN variance does depend on the split; the unnormalised one
  does not.)
- Var[log P_LLN] is measured like the softmax side: the unbiased variance over all N x N entries
  of the row-normalised (bidirectional) LLN matrix, averaged over independent draws. The same
  q, k draws serve every x (common random numbers), so the curve is smooth in x.
- The curve is convex in x, so the line depends on where it is fitted. We fit by least squares
  over the grid points (x = 0.5, 1.0, ...) whose Var[log P_LLN] lies in `var_range`. The default
  (0.01, 2.0) is what x from 1 to 15 (alpha = beta from 0.71 to 2.7 at unit sigma) spans at
  d = 64, and over it the fit reproduces the published constants: 64 draws give a = 0.1450,
  b = -0.3500 (-2.4% and +0.005 from published; seed-to-seed spread at 8 draws ~1.5% on a, 0.007
  on b). The interval is kept fixed across head dims because the target,
  Var[log P_SA] ~ sigma_q^2 sigma_k^2, does not depend on d, while the x that reaches it does.
- N (seq_len) hardly matters: N = 256 moves a, b by about their Monte-Carlo noise (~2%) from
  N = 128, the default.

Where the linear model holds: with the published d = 64 constants, Gaussian q, k, matched LLN
has Var[log P] within 10% of softmax's for sigma_q^2 sigma_k^2 from about 1.25 to 2.3 (N from 128
to 512; at N = 256: LLN/SA = 0.78 at 0.5, 0.86 at 1.0, 1.06 at 2.5, 1.10 at 3.0): outside it the
line misses the convex curve. Fitting over the operating range instead, e.g.
`fit_lln_log_variance(64, var_range=(0.25, 3.0))` (a ~ 0.176, b ~ -0.679), keeps LLN/SA within
8% from 0.5 to 4 (benchmarks/paper_claims.py); pass it as `moment_match(..., constants=...)`.
"""

from __future__ import annotations

import functools
import math
from numbers import Real

import torch
from torch import Tensor

from lln_core.instruments import lln_log_attention

PUBLISHED_HEAD_DIM = 64
PUBLISHED_CONSTANTS = (0.14855178144710912, -0.35487039130661086)

# Refits for common head dims: `fit_lln_log_variance` defaults (seq_len=128, seed=0) except
# num_samples=64 (about 7 minutes on one core for all seven). Regenerate with:
#   .venv/bin/python -c "from lln_core.moments import fit_lln_log_variance as f; \
#     [print(d, f(d, num_samples=64)) for d in (32, 48, 64, 80, 96, 128, 256)]"
# 64 is listed for comparison only: `lln_constants(64)` returns the published constants.
REFIT_CONSTANTS: dict[int, tuple[float, float]] = {
    32: (0.15995846701092964, -0.27459853262197254),
    48: (0.15346966250351718, -0.3353614219475345),
    64: (0.145015236078924, -0.3499842833611234),
    80: (0.13776654529097937, -0.3520066261621577),
    96: (0.1366404325871464, -0.3706856440634545),
    128: (0.13239540473680717, -0.4089233169297501),
    256: (0.11912523337918692, -0.4616064612584204),
}

# Floor on s2 = alpha^2 sigma_q^2: the linear model gives s2 <= 0 when sigma_q^2 sigma_k^2 <= b
# (possible only with b > 0). LLN then cannot be as flat as softmax; the floor makes it nearly
# uniform (alpha, beta tiny but positive), which is what softmax is at such a small variance.
MIN_S2 = 1e-6

_X_STEP = 0.5
_MAX_X = 200.0


def _check_head_dim(head_dim: int) -> None:
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int; got {head_dim!r}")


def _lln_log_variance(x: float, q: Tensor, k: Tensor) -> Tensor:
    """Var[log P_LLN] per draw `[S]` for q, k `[S, N, D]` ~ N(0, 1) and alpha = beta = sqrt(x/2)."""
    scale = math.sqrt(x / 2.0)
    log_p = lln_log_attention(q, k, scale, scale)
    return log_p.flatten(-2).var(dim=-1)


def _draws(head_dim: int, seq_len: int, num_samples: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_samples, seq_len, head_dim)
    q = torch.randn(shape, dtype=torch.float64, generator=gen)
    k = torch.randn(shape, dtype=torch.float64, generator=gen)
    return q, k


def _variance_curve(
    q: Tensor, k: Tensor, var_max: float, batch: int
) -> tuple[list[float], list[float]]:
    """Mean Var[log P_LLN] on the grid x = 0.5, 1.0, ... until it exceeds var_max."""
    xs: list[float] = []
    vs: list[float] = []
    starts = range(0, len(q), batch)
    x = _X_STEP
    while x <= _MAX_X:
        chunks = [_lln_log_variance(x, q[i : i + batch], k[i : i + batch]) for i in starts]
        xs.append(x)
        vs.append(torch.cat(chunks).mean().item())
        if vs[-1] > var_max:
            break
        x += _X_STEP
    return xs, vs


def fit_lln_log_variance(
    head_dim: int,
    *,
    seq_len: int = 128,
    num_samples: int = 16,
    var_range: tuple[float, float] = (0.01, 2.0),
    seed: int = 0,
) -> tuple[float, float]:
    """Fit Var[log P_LLN] ~ a x + b, x = alpha^2 sigma_q^2 + beta^2 sigma_k^2, by simulation.

    Gaussian q, k `[num_samples, seq_len, head_dim]` (float64), alpha = beta on the grid
    x = 0.5, 1.0, ...; least squares over the grid points whose measured Var[log P_LLN] lies in
    `var_range` (see the module docstring for why). Deterministic for a given seed.
    Cost ~ num_samples * seq_len^2 * head_dim * (grid points, ~35 at d = 64).
    """
    _check_head_dim(head_dim)
    low, high = var_range
    if seq_len < 2 or num_samples < 1 or not 0 <= low < high:
        raise ValueError("need seq_len >= 2, num_samples >= 1 and 0 <= var_range[0] < [1]")
    q, k = _draws(head_dim, seq_len, num_samples, seed)
    batch = max(1, (1 << 22) // (seq_len * seq_len * head_dim))
    xs, vs = _variance_curve(q, k, high, batch)
    points = [(x, v) for x, v in zip(xs, vs, strict=True) if low <= v <= high]
    if len(points) < 2:
        raise ValueError(f"fewer than two grid points with Var[log P] in {var_range}")
    design = torch.tensor([[x, 1.0] for x, _ in points], dtype=torch.float64)
    target = torch.tensor([[v] for _, v in points], dtype=torch.float64)
    a, b = torch.linalg.lstsq(design, target).solution[:, 0].tolist()
    return a, b


@functools.lru_cache(maxsize=32)
def _refit_cached(head_dim: int) -> tuple[float, float]:
    return fit_lln_log_variance(head_dim)


def lln_constants(head_dim: int) -> tuple[float, float]:
    """(a, b) for a head dim: published for 64, the precomputed table, else a (cached) refit."""
    _check_head_dim(head_dim)
    if head_dim == PUBLISHED_HEAD_DIM:
        return PUBLISHED_CONSTANTS
    if head_dim in REFIT_CONSTANTS:
        return REFIT_CONSTANTS[head_dim]
    return _refit_cached(head_dim)


def _is_number(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def _check_sigma(name: str, sigma: float | Tensor) -> None:
    if isinstance(sigma, Tensor):
        ok = bool(torch.isfinite(sigma).all()) and bool((sigma > 0).all())
    elif _is_number(sigma):
        ok = math.isfinite(sigma) and sigma > 0
    else:
        raise TypeError(f"{name} must be a float or a Tensor; got {type(sigma).__name__}")
    if not ok:
        raise ValueError(f"{name} must be positive and finite; got {sigma}")


def moment_match(
    sigma_q: float | Tensor,
    sigma_k: float | Tensor,
    head_dim: int,
    *,
    constants: tuple[float, float] | None = None,
) -> tuple[float, float] | tuple[Tensor, Tensor]:
    """(alpha, beta) with alpha^2 sigma_q^2 = beta^2 sigma_k^2 = s2, s2 = (sq^2 sk^2 - b) / (2a).

    sigma_q, sigma_k: stds of the raw q, k entries (see `head_std`); floats give floats, any
    tensor gives tensors broadcast together (e.g. `[H]` per head). (a, b) default to
    `lln_constants(head_dim)`. s2 is floored at MIN_S2 (see there).
    """
    _check_head_dim(head_dim)
    _check_sigma("sigma_q", sigma_q)
    _check_sigma("sigma_k", sigma_k)
    a, b = lln_constants(head_dim) if constants is None else constants
    if not a > 0:
        raise ValueError(f"the slope a must be positive; got {a}")
    if isinstance(sigma_q, Tensor) or isinstance(sigma_k, Tensor):
        like = sigma_q if isinstance(sigma_q, Tensor) else sigma_k
        dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
        sq = torch.as_tensor(sigma_q, dtype=dtype, device=like.device)
        sk = torch.as_tensor(sigma_k, dtype=dtype, device=like.device)
        s = ((sq.square() * sk.square() - b) / (2 * a)).clamp_min(MIN_S2).sqrt()
        return s / sq, s / sk
    s = math.sqrt(max((sigma_q**2 * sigma_k**2 - b) / (2 * a), MIN_S2))
    return s / sigma_q, s / sigma_k


def head_std(x: Tensor, num_kv_heads: int | None = None, mask: Tensor | None = None) -> Tensor:
    """Std of the entries of each head of x `[B, H, T, D]` -> float32 `[H]`.

    With `num_kv_heads`, the H query heads are pooled per KV group (heads g*G .. g*G+G-1 share KV
    head g, G = H / num_kv_heads, as in transformers' repeat_kv) -> `[num_kv_heads]`: the std of
    all the group's entries, not a mean of stds. `mask` `[B, T]` (bool) keeps only valid tokens.
    Unbiased, like the reference code's q.std(); computed in float64.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [B, H, T, D]; got {tuple(x.shape)}")
    batch, num_heads, seq_len, dim = x.shape
    groups = num_heads if num_kv_heads is None else num_kv_heads
    if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"num_kv_heads must be a positive int; got {num_kv_heads!r}")
    if num_heads % groups:
        raise ValueError(f"{num_heads} heads are not a multiple of num_kv_heads={groups}")
    values = x.detach().to(torch.float64).transpose(0, 1)  # [H, B, T, D]
    weights = torch.ones(batch, seq_len, dtype=torch.float64, device=x.device)
    if mask is not None:
        if mask.shape != (batch, seq_len):
            raise ValueError(f"mask must be [B, T] = {(batch, seq_len)}; got {tuple(mask.shape)}")
        weights = mask.to(torch.bool).to(torch.float64)
    values = values.reshape(groups, -1)
    weights = weights[None, None, :, :, None].expand(groups, num_heads // groups, -1, -1, dim)
    weights = weights.reshape(groups, -1)
    count = weights.sum(dim=-1)
    if bool((count < 2).any()):
        raise ValueError("every head (group) needs at least two valid entries")
    mean = (values * weights).sum(dim=-1) / count
    var = ((values - mean[:, None]).square() * weights).sum(dim=-1) / (count - 1)
    return var.sqrt().to(torch.float32)
