"""The in-process state store (the default): sessions in this process's memory, kept until
idle for `ttl_s` or pushed out by a byte budget (least recently used first)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from server.state_store.base import Session, SessionError, SessionInfo, StateStore


class InProcessStore(StateStore):
    """Evicted ids are remembered (up to `max_forgotten`), so that continuing one is an error
    that says so, never a silent fresh start. A restart loses every session."""

    kind = "memory"

    def __init__(self, max_bytes: int, ttl_s: float, max_forgotten: int = 10_000) -> None:
        self.max_bytes, self.ttl_s, self.max_forgotten = max_bytes, ttl_s, max_forgotten
        self._evictions = 0
        self._bytes_used = 0
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._in_use: dict[str, Session | None] = {}  # the state each one had when acquired
        self._evicted: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def num_sessions(self) -> int:
        return len(self._sessions)

    @property
    def bytes_used(self) -> int:
        return self._bytes_used

    @property
    def evictions(self) -> int:
        return self._evictions

    def acquire(self, session_id: str) -> Session | None:
        with self._lock:
            self.expire()
            if session_id in self._in_use:
                raise SessionError(f"session {session_id!r} is in use by another request")
            if session_id in self._evicted:
                raise SessionError(
                    f"session {session_id!r} was evicted ({self._evicted[session_id]}); "
                    "start a new session"
                )
            session = self._sessions.pop(session_id, None)
            if session is not None:
                self._bytes_used -= session.nbytes
            self._in_use[session_id] = session
            return session

    def release(self, session_id: str, session: Session) -> None:
        with self._lock:
            self._in_use.pop(session_id, None)
            self._keep(session_id, session)

    def abandon(self, session_id: str, previous: Session | None) -> None:
        with self._lock:
            self._in_use.pop(session_id, None)
            if previous is not None:
                self._keep(session_id, previous)

    def info(self, session_id: str) -> SessionInfo | None:
        with self._lock:
            self.expire()
            in_use = session_id in self._in_use
            session = self._sessions.get(session_id) or self._in_use.get(session_id)
            if session is None:
                return None
            age = time.monotonic() - session.last_used
            return SessionInfo(session_id, session.num_tokens, session.nbytes,
                               time.time() - age, in_use, tuple(session.pending))  # fmt: skip

    def delete(self, session_id: str) -> bool:
        with self._lock:
            if session_id in self._in_use:
                raise SessionError(f"session {session_id!r} is in use by another request")
            self._evicted.pop(session_id, None)
            session = self._sessions.pop(session_id, None)
            if session is not None:
                self._bytes_used -= session.nbytes
            return session is not None

    def expire(self) -> None:
        deadline = time.monotonic() - self.ttl_s
        with self._lock:
            while self._sessions:
                oldest_id, oldest = next(iter(self._sessions.items()))
                if oldest.last_used > deadline:
                    break
                self._evict(oldest_id, f"idle for more than {self.ttl_s:g} s")

    def _keep(self, session_id: str, session: Session) -> None:
        if self.max_bytes == 0 or session.nbytes > self.max_bytes:
            self._forget(session_id, "the session budget is too small for one state")
            return
        session.last_used = time.monotonic()
        self._sessions[session_id] = session
        self._bytes_used += session.nbytes
        while self._bytes_used > self.max_bytes:
            self._evict(next(iter(self._sessions)), "session memory budget")

    def _evict(self, session_id: str, reason: str) -> None:
        session = self._sessions.pop(session_id)
        self._bytes_used -= session.nbytes
        self._evictions += 1
        self._forget(session_id, reason)

    def _forget(self, session_id: str, reason: str) -> None:
        self._evicted[session_id] = reason
        while len(self._evicted) > self.max_forgotten:
            self._evicted.popitem(last=False)
