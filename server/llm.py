"""Offline API for scripts and benchmarks: `LLM(model).generate(prompts, sampling_params)`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from server.config import EngineConfig
from server.engine import LLMEngine, RequestOutput, TokenLogprob
from server.request import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None


class LLM:
    """Runs the engine to completion on a batch of prompts (strings or token id lists)."""

    def __init__(self, model: str = EngineConfig.model, **config) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **config))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[GenerationResult]:
        """One result per prompt, in order. Prompts are queued as the waiting queue allows."""
        token_lists = self._token_lists(prompts)
        params = _per_prompt(sampling_params, len(token_lists))
        results = {
            f"offline-{i}": GenerationResult(
                f"offline-{i}", ids, [CompletionOutput(j) for j in range(p.n)]
            )
            for i, (ids, p) in enumerate(zip(token_lists, params, strict=True))
        }
        pending = list(zip(results, token_lists, params, strict=True))[::-1]
        while pending or self.engine.has_unfinished():
            while pending and self.engine.can_accept(pending[-1][2].n):
                self.engine.add_request(*pending.pop())
            for output in self.engine.step():
                _collect(results[output.request_id], output)
        return list(results.values())

    def _token_lists(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        return [
            self.tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else list(p)
            for p in prompts
        ]


def _per_prompt(params, count: int) -> list[SamplingParams]:
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return list(params)


def _collect(result: GenerationResult, output: RequestOutput) -> None:
    choice = result.outputs[output.index]
    choice.text += output.text
    choice.token_ids += output.token_ids
    choice.logprobs += output.logprobs or []
    result.num_cached_tokens = max(result.num_cached_tokens, output.num_cached_tokens)
    if output.prompt_logprobs is not None:
        result.prompt_logprobs = output.prompt_logprobs
    if output.finished:
        choice.finish_reason = output.finish_reason
        choice.error = output.error
