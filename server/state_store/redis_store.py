"""The Redis state store: sessions (and optionally prefix states) in Redis, shared by every
replica and kept across restarts.

Keys (hash tags keep one session's keys in one Redis Cluster slot; the id is hashed, so any
string is a valid id): `lln:s:{H}:state` (the encoded state, expiring after the session TTL),
`:info` (tokens, bytes, last use, the pending token(s); kept a day longer, so that continuing
an expired session is a 409 that says so), `:lock` (the replica serving it now; expires unless
refreshed, so a crashed replica's lock frees itself), `:tmp:TOKEN` (a new state being written).

A save writes the new state under a temporary key, then one script swaps it in and unlocks,
only if this replica still holds the lock: a crash mid-write leaves the previous state, and a
replica whose lock expired cannot overwrite a newer state. Redis unreachable: session
operations raise StoreUnavailableError at once (503) while a monitor thread pings Redis every
second and marks the store available again when it answers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from server.state_store.base import (
    Session,
    SessionError,
    SessionInfo,
    Snapshot,
    StateStore,
    StoreUnavailableError,
)
from server.state_store.codec import StateTag, decode, encode

logger = logging.getLogger("lln_serve.state_store")
T = TypeVar("T")
INFO_GRACE_S = 86_400  # how long an expired session is remembered as expired

_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then redis.call('DEL', KEYS[2]) return 0 end
redis.call('RENAME', KEYS[2], KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[4], 'tokens', ARGV[3], 'bytes', ARGV[4], 'last_use', ARGV[5],
           'pending', ARGV[7])
redis.call('PEXPIRE', KEYS[4], ARGV[6])
redis.call('DEL', KEYS[1])
return 1
"""
_UNLOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end"
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def session_keys(session_id: str) -> dict[str, str]:
    h = hashlib.sha256(session_id.encode()).hexdigest()[:32]
    return {name: f"lln:s:{{{h}}}:{name}" for name in ("state", "info", "lock")}


class RedisStore(StateStore):
    """tag: this server's StateTag; template: an empty state of batch 1 (for decoding)."""

    kind = "redis"

    def __init__(
        self,
        url: str,
        tag: StateTag,
        template: Snapshot,
        *,
        ttl_s: float,
        lock_ttl_s: float = 30.0,
        share_prefixes: bool = False,
        timeout_s: float = 5.0,
        options: dict | None = None,
    ) -> None:
        self.url, self.tag, self.template = url, tag, template
        self.ttl_ms, self.lock_ms = int(ttl_s * 1000), int(lock_ttl_s * 1000)
        self._share_prefixes = share_prefixes
        self.state_bytes = sum(s.nbytes for s in template)
        # redis-py parses the URL (password, db, rediss:// and its query options); options
        # (password file, TLS files) fill in what the URL does not say
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=min(timeout_s, 2.0),
            retry=Retry(NoBackoff(), 1),  # one retry: a pooled socket to a restarted Redis
            **(options or {}),
        )  # fmt: skip
        self._commit = self.client.register_script(_COMMIT)
        self._unlock = self.client.register_script(_UNLOCK)
        self._extend = self.client.register_script(_EXTEND)
        self._held: dict[str, str] = {}  # session id -> lock token
        self._lock = threading.Lock()
        self._available = False
        self._num_sessions = 0
        self._last_error = "not connected yet"
        self._stop = threading.Event()
        self._ping()
        self._monitor = threading.Thread(target=self._watch, name="lln-redis-monitor", daemon=True)
        self._monitor.start()

    # ---- sessions ------------------------------------------------------------------------

    def acquire(self, session_id: str) -> Session | None:
        keys, token = session_keys(session_id), uuid.uuid4().hex
        started = time.perf_counter()
        if not self._call(lambda: self.client.set(keys["lock"], token, nx=True, px=self.lock_ms)):
            raise SessionError(f"session {session_id!r} is in use by another request")
        try:
            blob = self._call(lambda: self.client.get(keys["state"]))
            if blob is None:
                if self._call(lambda: self.client.exists(keys["info"])):
                    raise SessionError(
                        f"session {session_id!r} expired or was evicted from the state store "
                        "(Redis); start a new session"
                    )
                session = None
            else:
                session = decode(blob, self.tag, self.template, session_id)
        except BaseException:
            self._quiet(lambda: self._unlock(keys=[keys["lock"]], args=[token]))
            raise
        with self._lock:
            self._held[session_id] = token
        self._observe("load", started)
        return session

    def release(self, session_id: str, session: Session) -> None:
        keys = session_keys(session_id)
        with self._lock:
            token = self._held.pop(session_id, None)
        if token is None:
            raise SessionError(f"session {session_id!r} is not held by this server")
        started = time.perf_counter()
        blob = encode(session, self.tag)
        tmp = keys["state"].replace(":state", f":tmp:{token}")
        info = [token, self.ttl_ms, session.num_tokens, len(blob), time.time(),
                self.ttl_ms + INFO_GRACE_S * 1000, json.dumps(session.pending)]  # fmt: skip

        def write():
            pipe = self.client.pipeline(transaction=False)
            pipe.set(tmp, blob, px=max(self.lock_ms, 60_000))
            self._commit(keys=[keys["lock"], tmp, keys["state"], keys["info"]], args=info,
                         client=pipe)  # fmt: skip
            return pipe.execute()[-1]

        if not self._call(write):
            raise SessionError(
                f"session {session_id!r}: its lock expired before this turn's state was saved "
                "(another request took it over); this turn was not saved"
            )
        self._observe("save", started)

    def abandon(self, session_id: str, previous: Session | None) -> None:
        keys = session_keys(session_id)
        with self._lock:
            token = self._held.pop(session_id, None)
        if token is not None:  # unreachable: the lock expires by itself
            self._quiet(lambda: self._unlock(keys=[keys["lock"]], args=[token]))

    def info(self, session_id: str) -> SessionInfo | None:
        keys = session_keys(session_id)

        def read():
            pipe = self.client.pipeline(transaction=False)
            pipe.exists(keys["state"]).hgetall(keys["info"]).exists(keys["lock"])
            return pipe.execute()

        has_state, info, locked = self._call(read)
        if not has_state or not info:
            return None
        pending = info.get(b"pending")  # absent where an older server saved the session
        return SessionInfo(session_id, int(info[b"tokens"]), int(info[b"bytes"]),
                           float(info[b"last_use"]), bool(locked),
                           None if pending is None else tuple(json.loads(pending)))  # fmt: skip

    def delete(self, session_id: str) -> bool:
        keys = session_keys(session_id)
        if self._call(lambda: self.client.exists(keys["lock"])):
            raise SessionError(f"session {session_id!r} is in use by another request")
        return bool(self._call(lambda: self.client.delete(keys["state"], keys["info"])))

    # ---- prefix states -------------------------------------------------------------------

    @property
    def shares_prefixes(self) -> bool:
        return self._share_prefixes

    def _prefix_key(self, key: bytes) -> str:
        return f"lln:p:{self.tag.key()}:{key.hex()}"

    def get_prefix(self, keys: list[bytes]) -> tuple[int, Snapshot] | None:
        if not self._share_prefixes or not keys or not self._available:
            return None
        started = time.perf_counter()
        names = [self._prefix_key(k) for k in keys]
        try:
            exists = self._call(lambda: self._exists_each(names))
            found = [i for i, e in enumerate(exists) if e]
            if not found:
                return None
            blob = self._call(lambda: self.client.get(names[found[-1]]))
            if blob is None:
                return None
            session = decode(blob, self.tag, self.template, "prefix state")
        except (StoreUnavailableError, SessionError) as error:
            logger.warning("shared prefix state not used: %s", error)
            return None
        self._observe("prefix_load", started)
        return found[-1], session.snapshot

    def put_prefix(self, key: bytes, snapshot: Snapshot) -> None:
        if not self._share_prefixes or not self._available:
            return
        started = time.perf_counter()
        name = self._prefix_key(key)
        if self._quiet(lambda: self.client.exists(name)):
            return
        num_tokens = int(snapshot[0].num_tokens[0])
        blob = encode(Session(snapshot, [], num_tokens, 0), self.tag)
        self._quiet(lambda: self.client.set(name, blob, px=self.ttl_ms, nx=True))
        self._observe("prefix_save", started)

    def _exists_each(self, names: list[str]) -> list[int]:
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.exists(name)
        return pipe.execute()

    # ---- health --------------------------------------------------------------------------

    @property
    def is_available(self) -> bool:
        return self._available

    @property
    def last_error(self) -> str:
        return self._last_error

    @property
    def num_sessions(self) -> int:
        return self._num_sessions

    @property
    def bytes_used(self) -> int:
        return self._num_sessions * self.state_bytes  # every state has the same size

    def close(self) -> None:
        self._stop.set()
        self._monitor.join(timeout=5)
        self.client.close()

    def _watch(self) -> None:
        """Ping Redis (marks the store up or down), refresh held locks at a third of their
        expiry, count the sessions every 10 s."""
        refresh_s = self.lock_ms / 3000
        last_refresh = last_count = 0.0
        while not self._stop.wait(min(1.0, refresh_s)):
            if not self._ping():
                continue
            now = time.monotonic()
            if now - last_refresh >= refresh_s * 0.9:
                last_refresh = now
                self._refresh_locks()
            if now - last_count >= 10:
                last_count = now
                self._count_sessions()

    def _ping(self) -> bool:
        try:
            self.client.ping()
        except redis.RedisError as error:
            self._mark_down(error)
            return False
        if not self._available:
            logger.info("state store: Redis at %s is reachable", self._where())
        self._available = True
        return True

    def _refresh_locks(self) -> None:
        with self._lock:
            held = list(self._held.items())
        for session_id, token in held:
            lock = session_keys(session_id)["lock"]
            self._quiet(lambda lock=lock, token=token: self._extend(
                keys=[lock], args=[token, self.lock_ms]))  # fmt: skip

    def _count_sessions(self) -> None:
        count = self._quiet(lambda: sum(1 for _ in self.client.scan_iter("lln:s:*:state", 1000)))
        if count is not None:
            self._num_sessions = count

    def _call(self, fn: Callable[[], T]) -> T:
        """fn() against Redis; StoreUnavailableError at once while Redis is known down."""
        if not self._available:
            raise StoreUnavailableError(self._unavailable_message())
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as error:
            self._mark_down(error)
            raise StoreUnavailableError(self._unavailable_message()) from None

    def _quiet(self, fn: Callable[[], T]) -> T | None:
        try:
            return self._call(fn)
        except (StoreUnavailableError, redis.RedisError) as error:
            logger.warning("state store: %s", error)
            return None

    def _mark_down(self, error: Exception) -> None:
        if self._available:
            logger.warning("state store: Redis at %s is unreachable: %s", self._where(), error)
        self._available = False
        self._last_error = f"{type(error).__name__}: {error}"

    def _where(self) -> str:
        kwargs = self.client.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    def _unavailable_message(self) -> str:
        return (
            f"the session state store (Redis at {self._where()}) is unreachable "
            f"({self._last_error}); session requests fail until it is back, requests without "
            "a session_id are served"
        )
