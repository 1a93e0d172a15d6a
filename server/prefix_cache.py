"""Saved prompt-prefix states (LRU under a byte budget); sessions are in server/state_store/.

A snapshot is one sequence's state after some tokens: its size is that of one state, whatever
the prefix length (DESIGN.md section 4).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from server.state_store import Session, SessionError, Snapshot

__all__ = ["PrefixCache", "Session", "SessionError", "Snapshot", "prefix_hashes"]


def prefix_hashes(token_ids: Sequence[int], block: int, salt: bytes = b"") -> list[bytes]:
    """Chained hashes of the prefixes ending at every multiple of `block`: hash i covers
    tokens [0, (i + 1) * block). O(len) in all. The chain starts from `salt` (a tenant's and
    a request's cache_salt, `Tenant.prefix_salt`), so prompts under different salts never
    share a state."""
    hashes, previous = [], salt
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

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

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
