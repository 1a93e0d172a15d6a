"""Tenants: API keys that name who calls, what each may use, and the names that scope their
sessions and cached prefixes (DESIGN.md section 4; docs/security.md).

The keys file (`--api-keys-file`) has one key per line, then optionally the tenant's name and
its limits; `#` starts a comment line:

    sk-alice-0123456789   alice   max_concurrent=4  tokens_per_minute=20000
    sk-alice-rotated-key  alice
    sk-bob-9876543210     bob     max_concurrent=2

A key is 8 or more printable ASCII characters without whitespace; a tenant is 1-64 of
`A-Z a-z 0-9 . _ -` (default: `key-` and 8 hex digits of the key's SHA-256). Several keys may
name one tenant (rotation); its limits are given once or the same each time. Keys are kept as
SHA-256 digests and compared with `hmac.compare_digest`. A file that does not parse is refused
as a whole, naming the line (never the key): at start the server exits, on SIGHUP the keys
in force stay.

`--api-key` (one key) is the tenant `default`, whose sessions and prefixes are those of a
server without keys: unscoped.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("lln_serve.tenants")

DEFAULT_TENANT = "default"
TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MIN_KEY_LENGTH = 8
MAX_KEY_LENGTH = 1024
LIMIT_NAMES = ("max_concurrent", "tokens_per_minute")
BUCKET_BYTES = 8
SCOPE_SEPARATOR = "\x1f"  # never in a session id (the API refuses control characters)


class KeysFileError(ValueError):
    """A keys file that cannot be used; the message names the line, never the key."""


@dataclass(frozen=True)
class TenantLimits:
    """max_concurrent: sequences (prompts x n) running or queued at once; tokens_per_minute:
    prompt tokens at admission plus generated tokens as they come. None: no limit."""

    max_concurrent: int | None = None
    tokens_per_minute: int | None = None

    @property
    def is_limited(self) -> bool:
        return self.max_concurrent is not None or self.tokens_per_minute is not None


@dataclass(frozen=True)
class Tenant:
    name: str
    limits: TenantLimits = TenantLimits()

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_TENANT

    def session_key(self, session_id: str) -> str:
        """The store's id of this tenant's session `session_id` (the default tenant's: as is)."""
        return session_id if self.is_default else f"{self.name}{SCOPE_SEPARATOR}{session_id}"

    def prefix_salt(self, cache_salt: str | None = None) -> bytes:
        """What the prefix cache's chained hashes start from: b"" for the default tenant
        without a cache_salt (the unscoped cache), else a digest of tenant and salt."""
        if self.is_default and cache_salt is None:
            return b""
        text = f"{self.name}\x00{cache_salt or ''}\x00{cache_salt is not None}"
        return hashlib.sha256(text.encode()).digest()


DEFAULT = Tenant(DEFAULT_TENANT)


def key_digest(key: str | bytes) -> bytes:
    raw = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
    return hashlib.sha256(raw).digest()


def parse_keys(text: str) -> dict[bytes, Tenant]:
    """{SHA-256 of a key: its tenant} from a keys file's text. Raises KeysFileError."""
    keys: dict[bytes, Tenant] = {}
    first_line: dict[bytes, int] = {}
    limits: dict[str, tuple[TenantLimits, int]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        key, tenant = _parse_line(fields, number)
        digest = key_digest(key)
        if digest in keys:
            raise KeysFileError(f"line {number}: the same key as line {first_line[digest]}")
        seen = limits.setdefault(tenant.name, (tenant.limits, number))
        if tenant.limits.is_limited and seen[0] != tenant.limits:
            if seen[0].is_limited:
                raise KeysFileError(
                    f"line {number}: tenant {tenant.name!r} has other limits on line {seen[1]}"
                )
            limits[tenant.name] = (tenant.limits, number)
        keys[digest], first_line[digest] = tenant, number
    if not keys:
        raise KeysFileError("no keys (every line is empty or a comment)")
    # a tenant's limits, wherever given, hold for all its keys
    return {d: Tenant(t.name, limits[t.name][0]) for d, t in keys.items()}


def _parse_line(fields: list[str], number: int) -> tuple[str, Tenant]:
    key, rest = fields[0], fields[1:]
    if not MIN_KEY_LENGTH <= len(key) <= MAX_KEY_LENGTH:
        raise KeysFileError(
            f"line {number}: a key has {MIN_KEY_LENGTH} to {MAX_KEY_LENGTH} characters"
        )
    if not key.isascii() or not key.isprintable():
        raise KeysFileError(f"line {number}: a key is printable ASCII without whitespace")
    name = f"key-{key_digest(key).hex()[:8]}"
    if rest and "=" not in rest[0]:
        name, rest = rest[0], rest[1:]
        if not TENANT_NAME.fullmatch(name):
            raise KeysFileError(
                f"line {number}: tenant {name[:80]!r} is not 1-64 of A-Z a-z 0-9 . _ -"
            )
    return key, Tenant(name, _parse_limits(rest, number))


def _parse_limits(fields: list[str], number: int) -> TenantLimits:
    values: dict[str, int] = {}
    for item in fields:
        name, equals, value = item.partition("=")
        if not equals or name not in LIMIT_NAMES:
            raise KeysFileError(
                f"line {number}: {item[:80]!r} is not one of {', '.join(LIMIT_NAMES)}=N"
            )
        if name in values:
            raise KeysFileError(f"line {number}: {name} given twice")
        if not value.isdigit() or int(value) < 1:
            raise KeysFileError(f"line {number}: {name} must be an integer >= 1")
        values[name] = int(value)
    return TenantLimits(**values)


def read_keys_file(path: str | Path) -> dict[bytes, Tenant]:
    """parse_keys of a file. Raises KeysFileError (unreadable files too)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise KeysFileError(f"{path}: cannot be read: {error}") from None
    try:
        return parse_keys(text)
    except KeysFileError as error:
        raise KeysFileError(f"{path}: {error}") from None


class TenantRegistry:
    """Who a presented key belongs to. Open (no keys at all): everyone is `default`.
    Thread-safe; `reload` swaps the whole table at once, so a request sees the old keys or
    the new ones, never a mix."""

    def __init__(self, api_key: str | None = None, keys_file: str | Path | None = None) -> None:
        self.api_key, self.keys_file = api_key, keys_file
        self._lock = threading.Lock()
        self._table = _Table(self._load())

    @property
    def is_open(self) -> bool:
        return not self._table.keys

    @property
    def num_keys(self) -> int:
        return len(self._table.keys)

    @property
    def tenants(self) -> list[Tenant]:
        return sorted(set(self._table.keys.values()), key=lambda t: t.name)

    def authenticate(self, token: str | None) -> Tenant | None:
        """The tenant of `token` (the bearer token), or None for a missing or unknown key."""
        table = self._table
        if not table.keys:
            return DEFAULT
        if not token:
            return None
        # found by the first bytes of the digest of what was sent (their timing tells nothing
        # of a real key), then whole digests compared in constant time
        digest = key_digest(token)
        for known, tenant in table.buckets.get(digest[:BUCKET_BYTES], ()):
            if hmac.compare_digest(known, digest):
                return tenant
        return None

    def reload(self) -> int:
        """Read the keys file again; the keys in force stay if it does not parse (raises
        KeysFileError). Returns the number of keys now in force."""
        with self._lock:
            self._table = _Table(self._load())
            return len(self._table.keys)

    def _load(self) -> dict[bytes, Tenant]:
        keys = {} if self.keys_file is None else read_keys_file(self.keys_file)
        if self.api_key:
            digest = key_digest(self.api_key)
            if digest in keys:
                raise KeysFileError("--api-key is also a key in --api-keys-file")
            keys[digest] = DEFAULT
        return keys


class _Table:
    """The keys in force: {digest: tenant}, and the same grouped by the digest's first bytes."""

    def __init__(self, keys: dict[bytes, Tenant]) -> None:
        self.keys = keys
        self.buckets = _buckets(keys)


def _buckets(keys: dict[bytes, Tenant]) -> dict[bytes, list[tuple[bytes, Tenant]]]:
    buckets: dict[bytes, list[tuple[bytes, Tenant]]] = {}
    for digest, tenant in keys.items():
        buckets.setdefault(digest[:BUCKET_BYTES], []).append((digest, tenant))
    return buckets
