"""Requests as the engine sees them: sampling parameters, status, token counts. Torch-free."""

from __future__ import annotations

import enum
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

MAX_LOGPROBS = 20
"""Largest number of top alternatives per position (OpenAI's limit for chat completions)."""

GREEDY_EPS = 1e-5
"""Temperatures below this sample greedily (dividing logits by ~0 would overflow)."""


GuidedKind = Literal["json", "regex", "choice", "grammar"]
ANY_JSON_OBJECT = {"type": "object"}


@dataclass(frozen=True)
class GuidedSpec:
    """What the output must match; torch-free, part of SamplingParams. value: the JSON schema
    (as JSON text), the regex, the choices (a JSON list) or the Lark grammar."""

    kind: GuidedKind
    value: str

    @classmethod
    def json_schema(cls, schema: dict | str | bool | None) -> GuidedSpec:
        if schema is None or schema is True:
            schema = ANY_JSON_OBJECT
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as error:
                raise ValueError(f"the JSON schema is not valid JSON: {error}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls("json", json.dumps(schema))  # key order kept: it orders the output

    @classmethod
    def choice(cls, choices: Sequence[str]) -> GuidedSpec:
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("guided_choice must be a non-empty list of non-empty strings")
        return cls("choice", json.dumps(list(choices)))


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Invalid values raise ValueError naming the field.

    max_tokens None means "until a stop condition or the engine's limit". temperature 0 is
    greedy. top_k -1 or 0 disables top-k (stored as -1). `stop` takes a string or a sequence of
    strings and is stored as a tuple, `stop_token_ids` likewise. logprobs None returns no
    logprobs; 0..20 returns the sampled token's logprob plus that many top alternatives.
    guided: what the output must match (`server/guided.py`); logit_bias: (token id, bias)
    pairs added to the logits before anything else.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    guided: GuidedSpec | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 0)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be at most max_tokens ({self.max_tokens}), got {self.min_tokens}"
            )
        self._set("temperature", _check_float("temperature", self.temperature, 0.0, 2.0))
        self._set("top_p", _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True))
        self._check_top_k()
        self._set("min_p", _check_float("min_p", self.min_p, 0.0, 1.0))
        rp = _check_float("repetition_penalty", self.repetition_penalty, 0.0, math.inf, True)
        self._set("repetition_penalty", rp)
        for name in ("presence_penalty", "frequency_penalty"):
            self._set(name, _check_float(name, getattr(self, name), -2.0, 2.0))
        if self.seed is not None:
            _check_int("seed", self.seed, -(2**63), 2**63 - 1)  # a 64-bit integer
        self._set("stop", _check_stop(self.stop))
        self._set("stop_token_ids", _check_token_ids("stop_token_ids", self.stop_token_ids))
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0, MAX_LOGPROBS)
        if self.guided is not None and not isinstance(self.guided, GuidedSpec):
            raise ValueError(f"guided must be a GuidedSpec, got {self.guided!r}")
        self._set("logit_bias", _check_logit_bias(self.logit_bias))

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def _check_top_k(self) -> None:
        _check_int("top_k", self.top_k)
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        if self.top_k == 0:
            self._set("top_k", -1)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


def _check_int(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    # bool is an int subclass; `"n": true` in JSON is a client error, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def _check_float(
    name: str, value: object, low: float, high: float, low_open: bool = False
) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be in {bracket}{low}, {high}], got {value}")
    return float(value)


def _check_stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
    return tuple(stop)


def _check_logit_bias(bias: object) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: token id -> bias in [-100, 100] added to its logit."""
    items = bias.items() if isinstance(bias, dict) else bias
    try:
        pairs = [(int(str(token)), value) for token, value in items]
    except (TypeError, ValueError):
        raise ValueError(
            f"logit_bias must map token ids to numbers in [-100, 100], got {bias!r}"
        ) from None
    for token, value in pairs:
        _check_int("logit_bias token id", token, 0)
        _check_float("logit_bias value", value, -100.0, 100.0)
    return tuple((token, float(value)) for token, value in pairs)


def _check_token_ids(name: str, ids: object) -> tuple[int, ...]:
    if ids is None:
        return ()
    if not isinstance(ids, Sequence) or isinstance(ids, str):
        raise ValueError(f"{name} must be a list of token ids, got {ids!r}")
    for token in ids:
        _check_int(name, token, 0)
    return tuple(ids)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason ("stop", "length", "abort", "error"), None while unfinished."""
        return self.value if self.is_finished else None


@dataclass(eq=False)
class Request:
    """One sequence through the engine (a request with n > 1 becomes n of these).

    num_computed_tokens counts the tokens (prompt, then outputs) already folded into the
    slot's state. While prefilling it is the prompt prefix done so far; once the prompt is
    done, each decode step feeds `all_token_ids[num_computed_tokens]` (the last sampled token),
    so during decode num_computed_tokens == num_tokens - 1.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    slot: int | None = None
    finish_reason: str | None = None
    tenant: str | None = None  # whose request: the scheduler shares steps fairly among tenants

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError(f"request_id must be a non-empty string, got {self.request_id!r}")
        if not self.prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        self.prompt_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    @property
    def num_prefill_tokens_left(self) -> int:
        return max(self.num_prompt_tokens - self.num_computed_tokens, 0)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def last_token_id(self) -> int:
        """The token a decode step feeds: the last sampled one (or the prompt's last)."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
