"""Next-token sampling: penalties, temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Order per row (vLLM's): logit bias, the structured-output mask, min_tokens mask, repetition
penalty, frequency and presence penalties, then greedy argmax, or temperature, top-k, top-p,
min-p and a draw. Logprobs are the log_softmax of the model's raw logits, before any of these
(vLLM's default "raw_logprobs"): they describe the model, not the sampling distribution, and do
not change when a client tunes temperature.

Seeds: a row with a `torch.Generator` draws only from it, V exponentials per step, so a seeded
request samples the same tokens whatever else is in the batch. Rows without one share the
sampler's generator.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from server.request import SamplingParams

# An exponential draw can be exactly 0; p / 0 would turn a masked token (p = 0) into NaN.
_TINY = torch.finfo(torch.float32).tiny


@dataclass
class SamplerOutput:
    """Sampled tokens and, when any row asked, raw logprobs.

    token_ids: [B] int64. logprobs: [B] float32, the sampled token's. top_token_ids and
    top_logprobs: [B, N] with N the largest `logprobs` asked in the batch (rows take their own
    first params.logprobs columns), sorted by decreasing logprob.
    """

    token_ids: Tensor
    logprobs: Tensor | None = None
    top_token_ids: Tensor | None = None
    top_logprobs: Tensor | None = None

    def to_host(self) -> SamplerOutput:
        """The same on the CPU: one device-to-host copy of the ids (and of the logprobs when
        computed) per step, instead of one per row."""
        if self.token_ids.device.type == "cpu":
            return self
        tensors = (self.token_ids, self.logprobs, self.top_token_ids, self.top_logprobs)
        host = SamplerOutput(*(None if t is None else t.to("cpu", non_blocking=True)
                               for t in tensors))  # fmt: skip
        torch.cuda.current_stream(self.token_ids.device).synchronize()
        return host

    def row_logprobs(self, row: int, num_top: int) -> tuple[float, list[tuple[int, float]]]:
        """Row `row`'s sampled-token logprob and its `num_top` best alternatives, as Python."""
        if self.logprobs is None or self.top_token_ids is None or self.top_logprobs is None:
            raise ValueError("no logprobs were computed for this batch")
        ids = self.top_token_ids[row, :num_top].tolist()
        values = self.top_logprobs[row, :num_top].tolist()
        return self.logprobs[row].item(), list(zip(ids, values, strict=True))


class Sampler:
    """Samples one token per row of a logits batch. eos_token_ids: masked until min_tokens."""

    def __init__(
        self,
        eos_token_ids: Iterable[int] = (),
        seed: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.eos_token_ids = tuple(eos_token_ids)
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def make_generator(self, seed: int) -> torch.Generator:
        """The per-request generator for `seed`: create it once, pass it at every step."""
        return torch.Generator(self.device).manual_seed(seed % 2**64)  # n > 1: seed + index

    def __call__(
        self,
        logits: Tensor,
        params: Sequence[SamplingParams],
        prompt_token_ids: Sequence[Sequence[int]],
        output_token_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None] | None = None,
        allowed: Tensor | None = None,
    ) -> SamplerOutput:
        """logits [B, V] -> one token per row; generators[i] (or None) is row i's; allowed
        [B, V] bool (optional): the only tokens a row may take (structured outputs)."""
        logits = logits.float()
        generators = generators if generators is not None else [None] * len(params)
        edits = allowed is not None or any(p.logit_bias or p.min_tokens or p.has_penalties
                                           for p in params)  # fmt: skip
        work = apply_logit_bias(logits.clone() if edits else logits, params)  # [B, V]: 3 MB at 16
        if allowed is not None:
            work.masked_fill_(~allowed, -torch.inf)
        work = apply_min_tokens(
            work, params, [len(o) for o in output_token_ids], self.eos_token_ids
        )
        work = apply_penalties(work, params, prompt_token_ids, output_token_ids)
        token_ids = work.argmax(dim=-1)
        random_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            sampled = self._sample_rows(
                work[rows], [params[i] for i in random_rows], [generators[i] for i in random_rows]
            )
            token_ids[rows] = sampled
        return self._with_logprobs(logits, token_ids, params)

    def _sample_rows(
        self,
        logits: Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> Tensor:
        """logits [R, V] of non-greedy rows -> sampled token ids [R]."""
        device = logits.device
        logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            vocab = logits.shape[-1]
            top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
            top_p = torch.tensor([p.top_p for p in params], device=device)
            logits = apply_top_k_top_p(logits, top_k, top_p)
        if any(p.min_p > 0.0 for p in params):
            logits = apply_min_p(logits, torch.tensor([p.min_p for p in params], device=device))
        probs = torch.softmax(logits, dim=-1)
        return probs.div_(self._exponentials(probs, generators)).argmax(dim=-1)

    def _exponentials(self, probs: Tensor, generators: Sequence[torch.Generator | None]) -> Tensor:
        """Exp(1) draws [R, V]: argmax(p / q) is a sample from p (the exponential race)."""
        q = torch.empty_like(probs)
        shared = [i for i, g in enumerate(generators) if g is None]
        if shared:
            draws = torch.empty(len(shared), probs.shape[-1], device=probs.device)
            q[torch.tensor(shared, device=probs.device)] = draws.exponential_(
                generator=self.generator
            )
        for i, generator in enumerate(generators):
            if generator is not None:
                q[i].exponential_(generator=generator)
        return q.clamp_min_(_TINY)

    def _with_logprobs(
        self, logits: Tensor, token_ids: Tensor, params: Sequence[SamplingParams]
    ) -> SamplerOutput:
        asked = [p.logprobs for p in params if p.logprobs is not None]
        if not asked:
            return SamplerOutput(token_ids)
        chosen, top_ids, top_values = compute_logprobs(logits, token_ids, max(asked))
        return SamplerOutput(token_ids, chosen, top_ids, top_values)


def compute_logprobs(
    logits: Tensor, token_ids: Tensor, num_top: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Raw logprobs: logits [N, V], token_ids [N] -> (logprob of token_ids [N],
    top ids [N, num_top], top logprobs [N, num_top]). Also serves prompt_logprobs, with
    logits at positions 0..T-2 and the prompt's tokens 1..T-1 as token_ids.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, token_ids[:, None].long()).squeeze(-1)
    top_values, top_ids = logprobs.topk(num_top, dim=-1)
    return chosen, top_ids, top_values


def apply_logit_bias(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """OpenAI's logit_bias, added in place to the rows that set it."""
    for row, p in enumerate(params):
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], device=logits.device)
            bias = torch.tensor([b for _, b in p.logit_bias], device=logits.device)
            logits[row].index_add_(0, ids, bias)
    return logits


def apply_min_tokens(
    logits: Tensor,
    params: Sequence[SamplingParams],
    num_output_tokens: Sequence[int],
    eos_token_ids: Sequence[int],
) -> Tensor:
    """Mask (-inf, in place) EOS and stop_token_ids of rows with fewer than min_tokens outputs.

    EOS stays allowed under ignore_eos: there it does not end the sequence, so it is not a stop.
    """
    for row, (p, num_outputs) in enumerate(zip(params, num_output_tokens, strict=True)):
        if num_outputs < p.min_tokens:
            stops = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
            if stops:
                logits[row, stops] = -torch.inf
    return logits


def apply_penalties(
    logits: Tensor,
    params: Sequence[SamplingParams],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
) -> Tensor:
    """Penalties on logits [B, V] (in place), for the rows that set any.

    repetition (HF/vLLM): tokens seen in prompt or output get logit / r if positive, logit * r
    if not. frequency and presence (OpenAI), on output tokens:
    logit -= frequency * count + presence * (count > 0).
    """
    rows = [i for i, p in enumerate(params) if p.has_penalties]
    if not rows:
        return logits
    device, vocab = logits.device, logits.shape[-1]
    counts = _token_counts([output_token_ids[i] for i in rows], vocab, device)
    x = logits[rows]
    penalties = [params[i] for i in rows]
    repetition = torch.tensor([p.repetition_penalty for p in penalties], device=device)[:, None]
    if any(p.repetition_penalty != 1.0 for p in penalties):  # asked of the host: no device sync
        # A long prompt is scanned only for the rows that need it.
        prompts = [prompt_token_ids[i] if params[i].repetition_penalty != 1.0 else [] for i in rows]
        seen = (counts > 0) | (_token_counts(prompts, vocab, device) > 0)
        x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
    frequency = torch.tensor([p.frequency_penalty for p in penalties], device=device)[:, None]
    presence = torch.tensor([p.presence_penalty for p in penalties], device=device)[:, None]
    x = x - frequency * counts - presence * (counts > 0)
    logits[rows] = x
    return logits


def _token_counts(token_ids: Sequence[Sequence[int]], vocab: int, device: torch.device) -> Tensor:
    """Per-row occurrence counts [R, V] (float32) of lists of token ids."""
    length = max((len(ids) for ids in token_ids), default=0)
    # Pad with an extra bucket `vocab`, dropped after counting.
    padded = torch.full((len(token_ids), length), vocab, dtype=torch.long)
    for row, ids in enumerate(token_ids):
        padded[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    counts = torch.zeros(len(token_ids), vocab + 1, device=device)
    counts.scatter_add_(1, padded.to(device), torch.ones(padded.shape, device=device))
    return counts[:, :vocab]


def apply_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Keep each row's top_k [R] best tokens, then its smallest set of mass >= top_p [R].

    logits [R, V] -> new logits with the rest at -inf. top_k = V and top_p = 1 disable them.
    The best token is always kept.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    positions = torch.arange(vocab, device=logits.device)
    sorted_logits.masked_fill_(positions < (vocab - top_k)[:, None], -torch.inf)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    outside = cumulative <= 1.0 - top_p[:, None]
    outside[:, -1] = False
    sorted_logits.masked_fill_(outside, -torch.inf)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Mask tokens whose probability is below min_p [R] times the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, -torch.inf)
