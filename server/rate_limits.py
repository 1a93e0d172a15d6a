"""Per-tenant rate limits: sequences at once, and tokens per minute (a token bucket).

A request is admitted (a `Lease`) or refused before it reaches the engine's queue, so a tenant
at its limit holds no slot and no place in the queue: the others keep theirs. Refusals carry
the seconds to wait and OpenAI's `x-ratelimit-*` headers. Thread-safe.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.tenants import Tenant

CONCURRENCY_RETRY_S = 1.0  # a running request ends when it ends: ask again in a second


@dataclass
class Lease:
    """What an admitted request holds until its response is over."""

    tenant: Tenant
    num_sequences: int
    released: bool = False


class RateLimited(Exception):
    """429: limit is 'requests' (sequences at once) or 'tokens' (per minute)."""

    def __init__(self, message: str, limit: str, retry_after: float, headers: dict[str, str]):
        super().__init__(message)
        self.limit, self.retry_after = limit, retry_after
        self.headers = {**headers, "Retry-After": str(max(1, math.ceil(retry_after)))}


class TooLarge(ValueError):
    """A request no wait could admit (more sequences or prompt tokens than the limit): 400."""


@dataclass
class _Usage:
    running: int = 0
    tokens: float = 0.0  # the bucket's level (negative: generated tokens beyond it)
    updated: float = 0.0
    capacity: int | None = None


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._usage: dict[str, _Usage] = {}
        self._lock = threading.RLock()  # headers() inside admit()

    def admit(self, tenant: Tenant, num_sequences: int, num_tokens: int) -> Lease:
        """Admit `num_sequences` sequences whose prompts hold `num_tokens` tokens, or raise
        RateLimited (429) or TooLarge (400)."""
        limits = tenant.limits
        with self._lock:
            usage = self._refill(tenant)
            if limits.max_concurrent is not None:
                self._check_concurrency(tenant, usage, num_sequences)
            if limits.tokens_per_minute is not None:
                self._check_tokens(tenant, usage, num_tokens)
                usage.tokens -= num_tokens
            usage.running += num_sequences
        return Lease(tenant, num_sequences)

    def check(self, tenant: Tenant) -> None:
        """RateLimited if no request of the tenant could be admitted now: every concurrent
        sequence in use, or no token left (checked before a request's body is read)."""
        limits = tenant.limits
        if not limits.is_limited:
            return
        with self._lock:
            usage = self._refill(tenant)
            if limits.max_concurrent is not None:
                self._check_concurrency(tenant, usage, 1)
            if limits.tokens_per_minute is not None:
                self._check_tokens(tenant, usage, 1)

    def charge(self, tenant: Tenant, num_tokens: int) -> None:
        """Generated tokens, as they come."""
        if tenant.limits.tokens_per_minute is None:
            return
        with self._lock:
            usage = self._refill(tenant)
            usage.tokens = max(usage.tokens - num_tokens, -float(usage.capacity or 0))

    def release(self, lease: Lease) -> None:
        with self._lock:
            if lease.released:
                return
            lease.released = True
            usage = self._usage.get(lease.tenant.name)
            if usage is not None:
                usage.running = max(0, usage.running - lease.num_sequences)

    def running(self, tenant: Tenant) -> int:
        usage = self._usage.get(tenant.name)
        return 0 if usage is None else usage.running

    def headers(self, tenant: Tenant) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers of the tenant's limits ('requests': sequences at
        once, so its reset is a guess; 'tokens': the bucket's)."""
        limits = tenant.limits
        with self._lock:
            usage = self._refill(tenant)
            out: dict[str, str] = {}
            if limits.max_concurrent is not None:
                left = max(0, limits.max_concurrent - usage.running)
                out["x-ratelimit-limit-requests"] = str(limits.max_concurrent)
                out["x-ratelimit-remaining-requests"] = str(left)
                out["x-ratelimit-reset-requests"] = "0s" if left else _duration(1.0)
            if limits.tokens_per_minute is not None:
                tpm = limits.tokens_per_minute
                out["x-ratelimit-limit-tokens"] = str(tpm)
                out["x-ratelimit-remaining-tokens"] = str(max(0, int(usage.tokens)))
                out["x-ratelimit-reset-tokens"] = _duration((tpm - usage.tokens) * 60 / tpm)
            return out

    # ---- inside the lock -----------------------------------------------------------------

    def _refill(self, tenant: Tenant) -> _Usage:
        now, tpm = self.clock(), tenant.limits.tokens_per_minute
        usage = self._usage.get(tenant.name)
        if usage is None:
            usage = self._usage[tenant.name] = _Usage(tokens=float(tpm or 0), updated=now)
        if tpm is None:
            usage.capacity = None
            return usage
        if usage.capacity != tpm:  # a new limit (keys file reloaded): start full
            usage.capacity, usage.tokens = tpm, float(tpm)
        usage.tokens = min(float(tpm), usage.tokens + (now - usage.updated) * tpm / 60)
        usage.updated = now
        return usage

    def _check_concurrency(self, tenant: Tenant, usage: _Usage, num_sequences: int) -> None:
        limit = tenant.limits.max_concurrent
        if num_sequences > limit:
            raise TooLarge(
                f"this request runs {num_sequences} sequences (prompts x n); your limit is "
                f"{limit} at once"
            )
        if usage.running + num_sequences > limit:
            raise RateLimited(
                f"rate limit reached: {usage.running} of your {limit} concurrent sequences "
                "are in use; retry when one finishes",
                "requests", CONCURRENCY_RETRY_S, self.headers(tenant),
            )  # fmt: skip

    def _check_tokens(self, tenant: Tenant, usage: _Usage, num_tokens: int) -> None:
        tpm = tenant.limits.tokens_per_minute
        if num_tokens > tpm:
            raise TooLarge(
                f"the prompts hold {num_tokens} tokens; your limit is {tpm} tokens per minute"
            )
        if usage.tokens < num_tokens:
            wait = (num_tokens - usage.tokens) * 60 / tpm
            raise RateLimited(
                f"rate limit reached: {tpm} tokens per minute; {max(0, int(usage.tokens))} "
                f"left, this request needs {num_tokens}; retry in {wait:.1f} s",
                "tokens", wait, self.headers(tenant),
            )  # fmt: skip


def _duration(seconds: float) -> str:
    """OpenAI's reset format: 1s, 6m0s, 20ms."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"
