"""Saved states: prompt prefixes (LRU under a byte budget) and named sessions (TTL + budget).

A snapshot is one sequence's state after some tokens: its size is that of one state, whatever
the prefix length (DESIGN.md section 4).
"""

from __future__ import annotations

import hashlib
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lln_core.state import BatchedState

Snapshot = list[BatchedState]


def prefix_hashes(token_ids: Sequence[int], block: int) -> list[bytes]:
    """Chained hashes of the prefixes ending at every multiple of `block`: hash i covers
    tokens [0, (i + 1) * block). O(len) in all."""
    hashes, previous = [], b""
    for end in range(block, len(token_ids) + 1, block):
        chunk = array("q", token_ids[end - block : end]).tobytes()
        previous = hashlib.sha256(previous + chunk).digest()
        hashes.append(previous)
    return hashes


@dataclass
class PrefixCache:
    """Snapshots after prompt prefixes whose length is a multiple of `block` (the prefill chunk
    size, where chunked prefill stops anyway). max_bytes 0 disables the cache."""

    block: int
    max_bytes: int
    nbytes: Callable[[Snapshot], int]
    queries: int = 0
    hits: int = 0
    evictions: int = 0
    bytes_used: int = 0
    _entries: OrderedDict[bytes, tuple[Snapshot, int]] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, hashes: Sequence[bytes], prompt_len: int) -> tuple[int, Snapshot] | None:
        """The longest cached prefix (hashes from `prefix_hashes`) that leaves at least one of
        the prompt's prompt_len tokens to compute: (its length, its snapshot)."""
        if self.max_bytes == 0:
            return None
        self.queries += 1
        for i in range(min(len(hashes), (prompt_len - 1) // self.block) - 1, -1, -1):
            entry = self._entries.get(hashes[i])
            if entry is not None:
                self._entries.move_to_end(hashes[i])
                self.hits += 1
                return (i + 1) * self.block, entry[0]
        return None

    def wants(self, hashes: Sequence[bytes], end: int) -> bool:
        """Whether to snapshot after `end` prompt tokens: a block boundary not cached yet."""
        if self.max_bytes == 0 or end == 0 or end % self.block:
            return False
        return hashes[end // self.block - 1] not in self._entries

    def insert(self, hashes: Sequence[bytes], end: int, snapshot: Snapshot) -> None:
        """Cache the state after `end` prompt tokens (a multiple of block)."""
        size = self.nbytes(snapshot)
        key = hashes[end // self.block - 1]
        if size > self.max_bytes or key in self._entries:
            return
        self._entries[key] = (snapshot, size)
        self.bytes_used += size
        while self.bytes_used > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.bytes_used -= evicted
            self.evictions += 1


class SessionError(ValueError):
    """A session that cannot be continued: evicted, or already in use by another request."""


@dataclass
class Session:
    """A conversation's state after all its tokens but `pending` (the last sampled token(s),
    not yet fed to the model): the next request prefills pending + its new tokens."""

    snapshot: Snapshot
    pending: list[int]
    num_tokens: int
    nbytes: int
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class SessionStore:
    """Named states, kept until idle for `ttl_s` or pushed out by the byte budget (least
    recently used first). Evicted ids are remembered (up to `max_forgotten`), so that
    continuing one is an error that says so, never a silent fresh start."""

    max_bytes: int
    ttl_s: float
    max_forgotten: int = 10_000
    evictions: int = 0
    bytes_used: int = 0
    _sessions: OrderedDict[str, Session] = field(default_factory=OrderedDict)
    _in_use: set[str] = field(default_factory=set)
    _evicted: OrderedDict[str, str] = field(default_factory=OrderedDict)

    def __len__(self) -> int:
        return len(self._sessions)

    def acquire(self, session_id: str) -> Session | None:
        """Take a session for one request: its saved state, or None for a new session."""
        self.expire()
        if session_id in self._in_use:
            raise SessionError(f"session {session_id!r} is in use by another request")
        if session_id in self._evicted:
            raise SessionError(
                f"session {session_id!r} was evicted ({self._evicted[session_id]}); "
                "start a new session"
            )
        self._in_use.add(session_id)
        session = self._sessions.pop(session_id, None)
        if session is not None:
            self.bytes_used -= session.nbytes
        return session

    def peek(self, session_id: str) -> Session | None:
        """The saved session, without taking it or touching its age (for reporting; safe to
        call from another thread: one dict read)."""
        return self._sessions.get(session_id)

    def release(self, session_id: str, session: Session | None) -> None:
        """Give the session back: with its new state, or None to drop it (e.g. after an error)."""
        self._in_use.discard(session_id)
        if session is None:
            return
        if self.max_bytes == 0 or session.nbytes > self.max_bytes:
            self._forget(session_id, "the session budget is too small for one state")
            return
        session.last_used = time.monotonic()
        self._sessions[session_id] = session
        self.bytes_used += session.nbytes
        while self.bytes_used > self.max_bytes:
            oldest = next(iter(self._sessions))
            self._evict(oldest, "session memory budget")

    def expire(self) -> None:
        deadline = time.monotonic() - self.ttl_s
        while self._sessions:
            oldest_id, oldest = next(iter(self._sessions.items()))
            if oldest.last_used > deadline:
                break
            self._evict(oldest_id, f"idle for more than {self.ttl_s:g} s")

    def _evict(self, session_id: str, reason: str) -> None:
        session = self._sessions.pop(session_id)
        self.bytes_used -= session.nbytes
        self.evictions += 1
        self._forget(session_id, reason)

    def _forget(self, session_id: str, reason: str) -> None:
        self._evicted[session_id] = reason
        while len(self._evicted) > self.max_forgotten:
            self._evicted.popitem(last=False)
