"""Retention scores for the sparse cache: the model's own surprise over a span of text.

Measured on SmolLM2-135M (`../shared/notes/recall-prototype.md`): what must survive beyond the
window is a fact's whole sentence, in every head. A fact inserted in unrelated text is where
the model is surprised; its digits are not, but they sit next to the surprising words. So a
token's score is the largest surprise (next-token loss, -log p(x_t | x_<t)) within `span`
tokens either side, plus a small share of its own surprise to order tokens within one span.

The surprise of token t needs the logits at t - 1, i.e. the whole model's output, while the
layers need the scores of the tokens leaving their window. A token leaves the window W queries
after it arrived, so a piece of at most W - span + 1 tokens only needs surprises of tokens before
it (or its first, from the carried last hidden state): the model runs long inputs through in
such pieces, scoring each piece's tokens after its forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lln_core.state import BatchedState
from models.quantize import Bf16GemmLinear

# A token's own surprise breaks ties between tokens of one span (exact in binary).
OWN_SHARE = 1.0 / 1024
# Positions of the LM head scored at once: bounds the logits' memory.
SCORE_BLOCK = 128


@dataclass
class SurpriseState(BatchedState):
    """Per sequence: surprise of the last R tokens (ring: position p in slot p % R), the final
    hidden state of the last token and the log-sum-exp of its logits (the next token's surprise
    is lse - logit[token]). surprise [B, R], hidden [B, H], lse [B]; float32 (float64 for a
    float64 model)."""

    surprise: Tensor
    hidden: Tensor
    lse: Tensor

    @classmethod
    def empty(
        cls, batch: int, ring: int, hidden_size: int, device, dtype=torch.float32
    ) -> SurpriseState:
        return cls(
            surprise=torch.zeros(batch, ring, dtype=dtype, device=device),
            hidden=torch.zeros(batch, hidden_size, dtype=dtype, device=device),
            lse=torch.zeros(batch, dtype=dtype, device=device),
        )

    @property
    def ring(self) -> int:
        return self.surprise.shape[1]


def score_ring(window: int, span: int) -> int:
    """Ring length: every token whose surprise a leaving token's span can need."""
    return window + span + 1


def max_piece(window: int, span: int) -> int:
    """Longest input whose leaving tokens' scores are known before its forward."""
    return window - span + 1


@torch.no_grad()
def add_first_surprise(
    state: SurpriseState, first_ids: Tensor, num_tokens: Tensor, lm_head: nn.Linear
) -> SurpriseState:
    """Score the first new token of each row (position num_tokens [B]) from the carried last
    hidden state; position 0 has no surprise (0)."""
    weight = lm_head.weight[first_ids].to(state.hidden.dtype)  # [B, H]
    logit = (state.hidden * weight).sum(-1)
    if lm_head.bias is not None:
        logit = logit + lm_head.bias[first_ids].to(logit.dtype)
    surprise = torch.where(num_tokens > 0, state.lse - logit, 0.0)
    valid = torch.ones_like(first_ids[:, None], dtype=torch.bool)
    return _write(state, num_tokens[:, None], surprise[:, None], valid)


def evict_scores(
    state: SurpriseState, num_tokens: Tensor, seq_len: int, window: int, span: int
) -> Tensor:
    """Scores [B, T] of the tokens leaving the window at queries num_tokens + i (position
    num_tokens + i - window); positions below 0 get 0 (no token leaves there)."""
    device = num_tokens.device
    leaving = num_tokens[:, None] - window + torch.arange(seq_len, device=device)  # [B, T]
    offsets = torch.arange(-span, span + 1, device=device)
    near = leaving[:, :, None] + offsets  # [B, T, 2 span + 1]
    values = state.surprise.gather(1, (near % state.ring).flatten(1)).view_as(near)
    values = torch.where(near >= 0, values, 0.0)
    return values.amax(-1) + OWN_SHARE * values[..., span]


@torch.no_grad()  # scores only decide which pairs stay: no gradient flows through them
def record_surprise(
    state: SurpriseState,
    hidden: Tensor,
    ids: Tensor,
    num_tokens: Tensor,
    lengths: Tensor | None,
    lm_head: nn.Linear,
) -> tuple[SurpriseState, Tensor]:
    """After a forward over ids [B, T] from positions num_tokens [B] (final hidden states
    [B, T, H]): the surprise of tokens 1..L-1 of each row (L its valid length), the last valid
    token's hidden state and lse. Also returns the logits at that last token [B, V]."""
    batch, seq_len, _ = hidden.shape
    lengths = torch.full((batch,), seq_len, device=ids.device) if lengths is None else lengths
    rows = torch.arange(batch, device=ids.device)
    last = (lengths - 1).clamp_min(0)
    surprises, last_logits, last_lse = [], None, None
    for start in range(0, seq_len, SCORE_BLOCK):
        block = slice(start, min(start + SCORE_BLOCK, seq_len))
        logits = _head_logits(lm_head, hidden[:, block])  # [B, C, V]
        lse = _logsumexp(logits).to(state.lse.dtype)
        at_last = (last - start).clamp(0, logits.shape[1] - 1)
        here, here_lse = logits[rows, at_last].to(state.lse.dtype), lse[rows, at_last]
        in_block = (last >= block.start) & (last < block.stop)
        if last_logits is None:
            last_logits, last_lse = here, here_lse
        else:
            last_logits = torch.where(in_block[:, None], here, last_logits)
            last_lse = torch.where(in_block, here_lse, last_lse)
        nxt = ids[:, block.start + 1 : block.stop + 1]
        if nxt.shape[1] < logits.shape[1]:  # the last position has no next token here
            nxt = torch.cat([nxt, nxt.new_zeros(batch, logits.shape[1] - nxt.shape[1])], dim=1)
        surprises.append(lse - logits.gather(-1, nxt[..., None])[..., 0].to(lse.dtype))
    surprise = torch.cat(surprises, dim=1)[:, : seq_len - 1]  # of tokens 1..T-1
    positions = num_tokens[:, None] + 1 + torch.arange(seq_len - 1, device=ids.device)
    valid = torch.arange(1, seq_len, device=ids.device)[None] < lengths[:, None]
    state = _write(state, positions, surprise, valid)
    last_hidden = hidden[rows, last].to(state.hidden.dtype)
    has_tokens = (lengths > 0)[:, None]
    new = SurpriseState(
        surprise=state.surprise,
        hidden=torch.where(has_tokens, last_hidden, state.hidden),
        lse=torch.where(has_tokens[:, 0], last_lse, state.lse),
    )
    return new, last_logits


def _head_logits(lm_head: nn.Module, hidden: Tensor) -> Tensor:
    """The LM head's logits; a bfloat16 GEMM's stay bfloat16 (they are only reduced here)."""
    if isinstance(lm_head, Bf16GemmLinear):
        return lm_head.narrow_forward(hidden)
    return lm_head(hidden)


def _logsumexp(logits: Tensor) -> Tensor:
    """Log-sum-exp over the vocabulary (last dim) in float32 or wider, compiled: one fused
    kernel reads the logits in their own dtype, where eager widened a copy and made four
    passes over it (over [128, 49,152] bfloat16 logits: 2-4 ms vs 30 ms, the LM head's GEMM
    itself 15 ms). Rows go in flattened: one compilation serves every batch and block size
    above one row."""
    return _compiled_logsumexp(logits.reshape(-1, logits.shape[-1])).view(logits.shape[:-1])


@torch.compile(dynamic=True)
def _compiled_logsumexp(logits: Tensor) -> Tensor:
    return torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def _write(state: SurpriseState, positions: Tensor, values: Tensor, valid: Tensor) -> SurpriseState:
    """Surprises `values` [B, T] at `positions` [B, T] (T <= ring) where `valid`."""
    slots = positions % state.ring
    current = state.surprise.gather(1, slots)
    values = values.to(current.dtype)
    surprise = state.surprise.scatter(1, slots, torch.where(valid, values, current))
    return SurpriseState(surprise, state.hidden, state.lse)
