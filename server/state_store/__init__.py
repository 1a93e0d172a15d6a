"""Session and prefix states behind one interface: in this process (the default) or in Redis
(`--state-store redis://host:port/db`), serialised with safetensors and tagged with the model,
its revision and the state's shape (DESIGN.md section 4)."""

from __future__ import annotations

from server.state_store.base import (
    Session,
    SessionError,
    SessionInfo,
    Snapshot,
    StateStore,
    StoreUnavailableError,
)
from server.state_store.codec import StateTag, state_tag
from server.state_store.memory import InProcessStore

__all__ = [
    "InProcessStore",
    "Session",
    "SessionError",
    "SessionInfo",
    "Snapshot",
    "StateStore",
    "StateTag",
    "StoreUnavailableError",
    "open_store",
    "state_tag",
]


def open_store(
    url: str | None,
    tag: StateTag,
    template: Snapshot,
    *,
    max_bytes: int,
    ttl_s: float,
    lock_ttl_s: float = 30.0,
    share_prefixes: bool = False,
) -> StateStore:
    """The store for `url`: None or 'memory' for this process, 'redis://...' for Redis."""
    if url in (None, "", "memory"):
        return InProcessStore(max_bytes, ttl_s)
    from server.state_store.redis_store import RedisStore

    return RedisStore(url, tag, template, ttl_s=ttl_s, lock_ttl_s=lock_ttl_s,
                      share_prefixes=share_prefixes)  # fmt: skip
