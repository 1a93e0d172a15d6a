"""Calibration of a converted model on text, with its own softmax weights as the reference.

- alpha/beta per layer and KV head: the std of q and k after RoPE, moment-matched
  (lln_core.moments).
- For LLN + sliding window in one normalisation (combine="joint"): the per-head log-weight of
  the LLN part, set so that, on average over queries, the LLN part receives the attention mass
  that the softmax teacher puts on the same old keys. LLN's raw scale exp(alpha q).exp(beta k)
  is unrelated to softmax's exp(q.k / sqrt(d)), so without this the LLN part swamps the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lln_core.moments import head_std, moment_match
from models.configuration_lln import LLNConfig
from models.errors import ConversionError
from models.modeling_lln import LLNForCausalLM


@dataclass
class Calibration:
    """Per layer and KV head: the measured stds and the moment-matched alpha/beta."""

    sigma_q: Tensor  # [L, Hkv]
    sigma_k: Tensor
    alpha: Tensor
    beta: Tensor
    num_tokens: int

    mix: Tensor | None = None  # [L, Hq], the joint log-weight, when calibrated

    def to_json(self) -> dict:
        names = ("sigma_q", "sigma_k", "alpha", "beta", "mix")
        values = {k: getattr(self, k).tolist() for k in names if getattr(self, k) is not None}
        return {"num_tokens": self.num_tokens, **values}


@torch.no_grad()
def calibrate(
    model: LLNForCausalLM,
    token_ids: Tensor,
    *,
    seq_len: int = 512,
    progress: bool = True,
) -> Calibration:
    """Measure sigma_q, sigma_k (after RoPE) with the model's weights in softmax mode, set
    alpha/beta on `model` by moment matching, and return the numbers.

    token_ids: [N] calibration tokens, cut into sequences of seq_len.
    """
    config = model.config
    if token_ids.numel() < 2:
        raise ConversionError("calibration needs at least 2 tokens of text")
    teacher = softmax_twin(model)
    queries: list[list[Tensor]] = [[] for _ in range(config.num_hidden_layers)]
    keys: list[list[Tensor]] = [[] for _ in range(config.num_hidden_layers)]

    def observe(layer: int, q: Tensor, k: Tensor) -> None:
        queries[layer].append(q.float())
        keys[layer].append(k.float())

    for layer in teacher.model.layers:
        layer.self_attn.observer = observe
    num_seqs = math.ceil(token_ids.numel() / seq_len)
    for i in tqdm(range(num_seqs), desc="calibrating", disable=not progress):
        ids = token_ids[i * seq_len : (i + 1) * seq_len][None].to(model.device)
        if ids.shape[1] >= 2:
            teacher.forward_states(ids, logits_to_keep=1)
    num_kv = config.num_key_value_heads
    sigma_q = torch.stack([_pooled_std(qs, num_kv) for qs in queries])
    sigma_k = torch.stack([_pooled_std(ks, num_kv) for ks in keys])
    alpha, beta = moment_match(sigma_q, sigma_k, config.head_dim)
    mix = None
    if config.attention_kernel in ("lln", "lln_diag"):
        for layer, a, b in zip(model.model.layers, alpha, beta, strict=True):
            layer.self_attn.alpha.copy_(a)
            layer.self_attn.beta.copy_(b)
    if config.attention_kernel == "lln_diag" and config.combine == "joint":
        mix = torch.stack(
            [
                joint_log_weight(_as_batch(qs), _as_batch(ks), a, b, config)
                for qs, ks, a, b in zip(queries, keys, alpha, beta, strict=True)
            ]
        )
        for layer, w in zip(model.model.layers, mix, strict=True):
            layer.self_attn.mix.copy_(w)
    return Calibration(sigma_q, sigma_k, alpha, beta, int(token_ids.numel()), mix)


def softmax_twin(model: LLNForCausalLM) -> LLNForCausalLM:
    """The same weights with softmax attention (the teacher), sharing no parameters."""
    config = LLNConfig.from_dict({**model.config.to_dict(), "attention_kernel": "softmax"})
    twin = LLNForCausalLM(config).to(model.dtype).to(model.device)
    twin.load_state_dict(model.state_dict(), strict=False)
    return twin.eval()


def _as_batch(chunks: list[Tensor]) -> Tensor:
    """The calibration sequences of full length as one batch [B, H, T, D]."""
    length = chunks[0].shape[2]
    return torch.cat([c for c in chunks if c.shape[2] == length], dim=0)


def _pooled_std(chunks: list[Tensor], num_kv_heads: int) -> Tensor:
    """Std per KV group over all sequences: chunks of [1, H, T, D]."""
    return head_std(torch.cat(chunks, dim=2), num_kv_heads)


def joint_log_weight(
    q: Tensor, k: Tensor, alpha: Tensor, beta: Tensor, config: LLNConfig
) -> Tensor:
    """Per query head: mean over queries of the log-weight that gives the LLN part the teacher's
    attention mass on old keys (older than the window, not sinks).

    q: [B, Hq, T, D], k: [B, Hkv, T, D] (after RoPE; B sequences of T tokens). Returns [Hq].
    """
    num_heads, num_kv = q.shape[1], k.shape[1]
    group = num_heads // num_kv
    k = k.repeat_interleave(group, dim=1).double()
    q = q.double()
    a = alpha.double().repeat_interleave(group)[None, :, None, None]
    b = beta.double().repeat_interleave(group)[None, :, None, None]
    seq_len = q.shape[2]
    pos = torch.arange(seq_len)
    causal = pos[None] <= pos[:, None]
    near = (pos[None] > pos[:, None] - config.local_size) | (pos[None] < config.num_sinks)
    local, old = causal & near, causal & ~near
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    log_lln = _lln_log_weights(a * q, b * k)
    lse = lambda x, mask: torch.logsumexp(x.masked_fill(~mask, float("-inf")), dim=-1)  # noqa: E731
    log_all, log_local, log_old = lse(logits, causal), lse(logits, local), lse(logits, old)
    old_mass = (log_old - log_all).exp().clamp(1e-6, 1 - 1e-6)
    log_weight = old_mass.log() - (-old_mass).log1p() + log_local - lse(log_lln, old)
    has_old = old.any(dim=-1)  # queries past the window
    return log_weight[..., has_old].mean(dim=(0, 2)).float()


def _lln_log_weights(aq: Tensor, bk: Tensor) -> Tensor:
    """log(exp(aq_t).exp(bk_s)) for all pairs, [B, H, T, T], as one matrix product: per-dim
    shifts keep exp finite and are added back (exact up to rounding of tiny terms)."""
    shift_k = bk.amax(dim=2, keepdim=True)  # [B, H, 1, D]
    log_q = aq + shift_k
    row = log_q.amax(dim=-1, keepdim=True)  # [B, H, T, 1]
    product = torch.exp(log_q - row) @ torch.exp(bk - shift_k).transpose(-1, -2)
    return product.clamp_min(1e-300).log() + row
