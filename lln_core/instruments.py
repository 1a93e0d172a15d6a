"""The paper's instruments on an attention matrix: entropy, spectral gap, log-variance, temperature.

Source: Nahshan, Kampeas, Haleva, "Linear Log-Normal Attention with Unbiased Concentration"
(arXiv 2311.13541, ICLR 2024) and its reference code (github ynahshan/linear-lognormal-attention,
`lln/lln_attention.py`). The stored copies of the paper we could reach hold only its abstract and
summaries, so the definitions below follow the brief (DESIGN.md section 2), the reference code
and those summaries; where we had to choose, the docstring says so.

- Entropy (paper: concentration measured by entropy, lower = more concentrated):
  H(P) = -(1/N) sum_ij P_ij log P_ij, the mean row entropy; 0 log 0 = 0. Uniform rows give log N,
  one-hot rows give 0.
- Spectral gap (paper: P read as a Markov chain's transition matrix): 1 - |lambda_2(P)|, with the
  eigenvalues sorted by magnitude; for a row-stochastic P, |lambda_1| = 1. A large gap means rows
  that look alike (mixing fast, towards rank one); a small gap means rows concentrating on
  *different* tokens. Together with entropy this separates the paper's "unbiased" concentration
  (entropy and gap fall together) from "biased" concentration (entropy falls, gap stays near 1).
- Log-variance: Var[log P] over the positive entries of one matrix (the quantity Proposition 3.1
  predicts to be sigma_q^2 sigma_k^2 for softmax with Gaussian q, k).
- Temperature (our choice, see `effective_temperature`): tau = 1 / std(log P). For softmax on
  Gaussian q, k this is 1 / (sigma_q sigma_k), the tau of softmax(z / tau) with unit-variance
  logits z; the same definition applies unchanged to LLN, so both can share one x axis.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Cap on the elements of the [rows, N, D] intermediate of the LLN log-scores (32 MiB in float64).
_MAX_CHUNK_ELEMENTS = 1 << 22


def _check_square(P: Tensor, name: str = "P") -> None:
    if P.dim() < 2 or P.shape[-1] != P.shape[-2]:
        raise ValueError(f"{name} must be [..., N, N]; got {tuple(P.shape)}")


def attention_entropy(P: Tensor) -> Tensor:
    """Mean row entropy H = -(1/N) sum_ij P_ij log P_ij of P `[..., N, N]`; returns `[...]`."""
    _check_square(P)
    return -torch.xlogy(P, P).sum(dim=-1).mean(dim=-1)


def spectral_gap(P: Tensor) -> Tensor:
    """1 - |lambda_2(P)| for P `[..., N, N]` (N >= 2); returns `[...]` (real, P's dtype).

    Use the bidirectional (unmasked) matrix, as the paper does: a causal P is lower-triangular,
    so its eigenvalues are its diagonal entries and the "gap" only reports the diagonal.
    """
    _check_square(P)
    if P.shape[-1] < 2:
        raise ValueError("spectral gap needs N >= 2")
    magnitudes = torch.linalg.eigvals(P).abs()
    second = magnitudes.topk(2, dim=-1).values[..., 1]
    return (1.0 - second).to(P.dtype)


def log_attention_variance(P: Tensor) -> Tensor:
    """Unbiased variance of log P over the positive entries of each matrix `[..., N, N]` -> `[...]`.

    Zeros (a causal mask, underflow) are left out rather than counted as log 0 = -inf.
    """
    _check_square(P)
    positive = P > 0
    count = positive.flatten(-2).sum(dim=-1)
    if bool((count < 2).any()):
        raise ValueError("each matrix needs at least two positive entries")
    log_p = torch.where(positive, P, torch.ones_like(P)).log().flatten(-2)
    weights = positive.flatten(-2).to(log_p.dtype)
    mean = (log_p * weights).sum(dim=-1) / count
    centered = (log_p - mean[..., None]) * weights
    return centered.square().sum(dim=-1) / (count - 1)


def effective_temperature(P: Tensor) -> Tensor:
    """tau = 1 / sqrt(Var[log P]) per matrix `[..., N, N]` -> `[...]`.

    Our definition (the paper's exact one was not reachable): a log-normal attention matrix is a
    softmax of logits with standard deviation 1 / tau, so this is the temperature of
    softmax(z / tau) with unit-variance z. For softmax attention on Gaussian q, k it is
    1 / (sigma_q sigma_k) (Proposition 3.1); lower tau means more concentrated attention.
    """
    return log_attention_variance(P).rsqrt()


def _broadcast_scale(scale: float | Tensor, like: Tensor) -> float | Tensor:
    """alpha/beta as a float, or a tensor over the leading dims `[...]` of q `[..., N, D]`."""
    if isinstance(scale, Tensor):
        return scale.to(like.dtype)[..., None, None]
    return float(scale)


def _floating(x: Tensor) -> Tensor:
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _check_qk(q: Tensor, k: Tensor) -> None:
    if q.dim() < 2 or k.dim() < 2 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k must be [..., N, D] with equal D; got {q.shape}, {k.shape}")


def _causal_mask(scores: Tensor) -> Tensor:
    rows, cols = scores.shape[-2:]
    keep = torch.ones(rows, cols, dtype=torch.bool, device=scores.device).tril()
    return scores.masked_fill(~keep, float("-inf"))


def softmax_log_attention(q: Tensor, k: Tensor, *, causal: bool = False) -> Tensor:
    """log softmax(q k^T / sqrt(D)) for q `[..., N, D]`, k `[..., M, D]` -> `[..., N, M]`."""
    _check_qk(q, k)
    q, k = _floating(q), _floating(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        scores = _causal_mask(scores)
    return torch.log_softmax(scores, dim=-1)


def lln_log_attention(
    q: Tensor, k: Tensor, alpha: float | Tensor, beta: float | Tensor, *, causal: bool = False
) -> Tensor:
    """log of the row-normalised exp(alpha q) exp(beta k)^T, computed in log space.

    q `[..., N, D]`, k `[..., M, D]` -> `[..., N, M]`; alpha, beta floats or tensors over the
    leading dims `[...]`. log(phi_q(q_i) . phi_k(k_j)) = logsumexp_d(alpha q_id + beta k_jd), then
    a log-softmax over keys: no exp of a raw score, so float64 inputs give float64-exact results.
    Query rows are processed in chunks to bound the `[rows, M, D]` intermediate.
    """
    _check_qk(q, k)
    q, k = _floating(q), _floating(k)
    aq = q * _broadcast_scale(alpha, q)
    bk = (k * _broadcast_scale(beta, k)).unsqueeze(-3)  # [..., 1, M, D]
    rows = max(1, _MAX_CHUNK_ELEMENTS // max(1, k.shape[-2] * k.shape[-1]))
    chunks = [
        torch.logsumexp(aq[..., start : start + rows, None, :] + bk, dim=-1)
        for start in range(0, q.shape[-2], rows)
    ]
    log_scores = torch.cat(chunks, dim=-2)
    if causal:
        log_scores = _causal_mask(log_scores)
    return torch.log_softmax(log_scores, dim=-1)


def attention_matrices(
    q: Tensor, k: Tensor, alpha: float | Tensor, beta: float | Tensor, *, causal: bool = False
) -> tuple[Tensor, Tensor]:
    """(P_sa, P_lln), each `[..., N, N]`, for q, k `[..., N, D]`.

    P_sa = softmax(q k^T / sqrt(D)); P_lln = exp(alpha q) exp(beta k)^T normalised over keys (no
    1/sqrt(D)). Both in q's floating dtype: pass float64 for references. With `causal`, entries
    j > i are exactly 0.
    """
    p_sa = softmax_log_attention(q, k, causal=causal).exp()
    p_lln = lln_log_attention(q, k, alpha, beta, causal=causal).exp()
    return p_sa, p_lln
