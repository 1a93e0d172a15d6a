"""Session and prefix states behind one interface: in this process (the default) or in Redis
(`--state-store redis://host:port/db`), serialised with safetensors and tagged with the model,
its revision and the state's shape (DESIGN.md section 4)."""

from __future__ import annotations

from pathlib import Path

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
    "redis_options",
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
    options: dict | None = None,
) -> StateStore:
    """The store for `url`: None or 'memory' for this process, 'redis://...' for Redis
    (options: more redis-py connection arguments, `redis_options`)."""
    if url in (None, "", "memory"):
        return InProcessStore(max_bytes, ttl_s)
    from server.state_store.redis_store import RedisStore

    return RedisStore(url, tag, template, ttl_s=ttl_s, lock_ttl_s=lock_ttl_s,
                      share_prefixes=share_prefixes, options=options)  # fmt: skip


def redis_options(
    password_file: str | None = None,
    ca_cert: str | None = None,
    cert: str | None = None,
    key: str | None = None,
) -> dict:
    """redis-py connection arguments: the password read from a file (a mounted secret; its
    trailing newline dropped), and TLS files (rediss://: the server's certificate is verified
    against ca_cert, and cert/key are this client's). Raises ValueError for an unreadable
    password file."""
    options: dict = {}
    if password_file:
        try:
            options["password"] = Path(password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"state store password file {password_file}: {error}") from None
    if ca_cert:
        options["ssl_ca_certs"] = ca_cert
    if cert:
        options["ssl_certfile"], options["ssl_keyfile"] = cert, key
    if ca_cert or cert:
        options["ssl_cert_reqs"] = "required"
    return options
