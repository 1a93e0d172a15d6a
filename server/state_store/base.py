"""The state store's interface: named session states (and optionally prefix states) kept in
this process or in Redis, so that a conversation survives restarts and moves between replicas.

A store is used from several threads (the API's workers and the engine's writer), so every
backend is thread-safe. Errors: SessionError (the API's 409) and StoreUnavailableError (503).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from lln_core.state import BatchedState

Snapshot = list[BatchedState]


class SessionError(ValueError):
    """A session that cannot be continued: evicted, in use by another request, or saved by
    another model or configuration."""


class StoreUnavailableError(RuntimeError):
    """The store cannot be reached (Redis down): session requests get 503, others go on."""


@dataclass
class Session:
    """A conversation's state after all its tokens but `pending` (the last sampled token(s),
    not yet fed to the model): the next request prefills pending + its new tokens."""

    snapshot: Snapshot
    pending: list[int]
    num_tokens: int
    nbytes: int
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class SessionInfo:
    """What `GET /v1/sessions/{id}` reports: tokens seen, bytes, last use (Unix seconds); and
    the pending token(s) (how a continued chat is rendered; None where the store does not know
    them, e.g. a session saved by an older server)."""

    session_id: str
    num_tokens: int
    nbytes: int
    last_used: float
    in_use: bool
    pending: tuple[int, ...] | None = None


class StateStore(ABC):
    """Sessions: acquire (lock + load) when a request starts, release (save + unlock) or
    abandon (unlock, keep the previous state) when it ends. Prefix states: optional sharing."""

    #: 'memory' or 'redis'
    kind: str = "memory"
    #: called with (operation, seconds) after every store operation (metrics)
    observe: Callable[[str, float], None] | None = None

    @abstractmethod
    def acquire(self, session_id: str) -> Session | None:
        """Lock the session for one request and return its state (None: a new session).
        Raises SessionError (in use, evicted, foreign state) or StoreUnavailableError."""

    @abstractmethod
    def release(self, session_id: str, session: Session) -> None:
        """Save the session's new state and unlock it. Raises StoreUnavailableError."""

    @abstractmethod
    def abandon(self, session_id: str, previous: Session | None) -> None:
        """Unlock after a failure or abort: the session keeps its previous state."""

    @abstractmethod
    def info(self, session_id: str) -> SessionInfo | None:
        """The saved session, or None if there is none. Takes no session lock (reporting, and
        rendering a continued chat). Raises StoreUnavailableError."""

    @abstractmethod
    def delete(self, session_id: str) -> bool:
        """Forget a session (False if there was none). SessionError while it is in use."""

    @property
    def is_available(self) -> bool:
        return True

    @property
    def num_sessions(self) -> int:
        return 0

    @property
    def bytes_used(self) -> int:
        return 0

    @property
    def evictions(self) -> int:
        return 0

    @property
    def shares_prefixes(self) -> bool:
        return False

    def get_prefix(self, keys: list[bytes]) -> tuple[int, Snapshot] | None:
        """The longest shared prefix state among `keys` (prefix hashes, shortest first): (its
        index in keys, its state). None when not shared, unreachable or not found."""
        return None

    def put_prefix(self, key: bytes, snapshot: Snapshot) -> None:
        """Share a prefix state (no-op unless shared)."""
        return None

    def close(self) -> None:
        """Stop background threads and connections."""
        return None

    def _observe(self, operation: str, started: float) -> None:
        if self.observe is not None:
            self.observe(operation, time.perf_counter() - started)
