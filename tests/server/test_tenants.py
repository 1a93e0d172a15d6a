"""Tenants without a server: the keys file (hostile ones too), key lookup and reload, scoping
of sessions and prefixes, rate limits with OpenAI's headers, the metrics' label cap, and the
Redis options (password file, TLS files, a redacted URL)."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from server.cli import build_parser, run_serve
from server.config import EngineConfig, ServerConfig, redacted_url
from server.metrics import TenantMetrics
from server.prefix_cache import prefix_hashes
from server.rate_limits import RateLimited, RateLimiter, TooLarge
from server.state_store import redis_options
from server.tenants import (
    DEFAULT,
    KeysFileError,
    Tenant,
    TenantLimits,
    TenantRegistry,
    parse_keys,
)

KEYS = """
# the team's keys
sk-alice-0001   alice  max_concurrent=2 tokens_per_minute=600
sk-alice-0002   alice
  sk-bob-000001 bob
sk-carol-00001
"""


def by_name(text: str) -> dict[str, Tenant]:
    return {t.name: t for t in parse_keys(text).values()}


def test_a_keys_file_gives_tenants_their_keys_and_limits():
    tenants = by_name(KEYS)
    assert set(tenants) == {"alice", "bob", next(n for n in tenants if n.startswith("key-"))}
    assert tenants["alice"].limits == TenantLimits(max_concurrent=2, tokens_per_minute=600)
    assert tenants["bob"].limits == TenantLimits()
    assert len(parse_keys(KEYS)) == 4  # two keys for alice (rotation), both with her limits
    assert {t.limits for t in parse_keys(KEYS).values() if t.name == "alice"} == {
        tenants["alice"].limits
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no keys"),
        ("# only a comment\n\n   \n", "no keys"),
        ("sk-same-key-1 a\nsk-same-key-1 b\n", "line 2: the same key as line 1"),
        ("short a\n", "line 1: a key has 8"),
        # whitespace separates fields: a key "with spaces in it" cannot be written
        ("sk-key with spaces\n", "line 1: a key has 8"),
        ("sk-key-000 with spaces\n", "line 1: 'spaces' is not one of"),
        ("sk-valid-key alice bogus\n", "line 1: 'bogus' is not one of"),
        ("sk-valid-key al/ice\n", "line 1: tenant 'al/ice'"),
        ("sk-valid-key alice max_concurrent=0\n", "max_concurrent must be an integer >= 1"),
        ("sk-valid-key alice max_concurrent=x\n", "max_concurrent must be an integer >= 1"),
        ("sk-valid-key a max_concurrent=1 max_concurrent=2\n", "given twice"),
        ("sk-valid-kéy alice\n", "printable ASCII"),
        ("sk-key-000001 a max_concurrent=1\nsk-key-000002 a max_concurrent=2\n", "other limits"),
    ],
)
def test_a_bad_keys_file_is_refused_naming_the_line_never_the_key(text, message):
    with pytest.raises(KeysFileError, match=message) as caught:
        parse_keys(text)
    assert "sk-same-key-1" not in str(caught.value) and "sk-valid-k" not in str(caught.value)


def test_a_key_with_whitespace_around_it_is_the_key(tmp_path):
    path = tmp_path / "keys"
    path.write_text("  \tsk-spaced-key-1\t alice  \r\n")
    registry = TenantRegistry(keys_file=path)
    assert registry.authenticate("sk-spaced-key-1").name == "alice"
    assert registry.authenticate(" sk-spaced-key-1") is None  # the API strips the header
    assert registry.authenticate("sk-spaced-key") is None


def test_lookup_open_single_key_and_keys_file(tmp_path):
    assert TenantRegistry().authenticate(None) is DEFAULT  # no keys: open, one tenant
    single = TenantRegistry(api_key="k")
    assert single.authenticate("k") is DEFAULT
    assert single.authenticate("K") is None and single.authenticate("") is None
    path = tmp_path / "keys"
    path.write_text(KEYS)
    both = TenantRegistry(api_key="admin-key", keys_file=path)
    assert both.authenticate("admin-key") is DEFAULT
    assert both.authenticate("sk-alice-0002").name == "alice" and both.num_keys == 5
    path.write_text("admin-key dup\n")
    with pytest.raises(KeysFileError, match="--api-key is also a key"):
        TenantRegistry(api_key="admin-key", keys_file=path)


def test_reload_swaps_the_keys_or_keeps_them_when_the_file_is_bad(tmp_path):
    path = tmp_path / "keys"
    path.write_text("sk-alice-0001 alice\n")
    registry = TenantRegistry(keys_file=path)
    path.write_text("sk-alice-0003 alice\nsk-dave-00001 dave\n")
    assert registry.reload() == 2
    assert registry.authenticate("sk-alice-0001") is None
    assert registry.authenticate("sk-dave-00001").name == "dave"
    for bad in ("", "sk-x-000001\nsk-x-000001\n"):
        path.write_text(bad)
        with pytest.raises(KeysFileError):
            registry.reload()
        assert registry.authenticate("sk-dave-00001").name == "dave"  # the old keys stay
    path.unlink()
    with pytest.raises(KeysFileError, match="cannot be read"):
        registry.reload()
    with pytest.raises(KeysFileError, match="cannot be read"):
        TenantRegistry(keys_file=path)


def test_wrong_keys_cost_no_more_than_the_right_one(tmp_path):
    path = tmp_path / "keys"
    path.write_text("".join(f"sk-tenant-{i:06d} t{i}\n" for i in range(1000)))
    registry = TenantRegistry(keys_file=path)
    started = time.perf_counter()
    for i in range(10_000):
        assert registry.authenticate(f"sk-wrong-{i:06d}") is None
    per_call = (time.perf_counter() - started) / 10_000
    assert per_call < 1e-4  # no scan of the keys
    assert registry.authenticate("sk-tenant-000999").name == "t999"


def test_sessions_and_prefixes_are_scoped_by_tenant_and_cache_salt():
    alice, bob = Tenant("alice"), Tenant("bob")
    assert DEFAULT.session_key("s") == "s"  # a server without keys: as before
    assert alice.session_key("s") != bob.session_key("s") != "s"
    prompt, block = list(range(12)), 4
    plain = prefix_hashes(prompt, block)
    assert prefix_hashes(prompt, block, DEFAULT.prefix_salt()) == plain
    salts = {DEFAULT.prefix_salt("x"), alice.prefix_salt(), alice.prefix_salt("x"),
             bob.prefix_salt(), bob.prefix_salt("x"), alice.prefix_salt("")}  # fmt: skip
    assert len(salts) == 6
    hashed = [prefix_hashes(prompt, block, s) for s in salts]
    assert all(not set(h) & set(plain) for h in hashed)
    assert len({h[0] for h in hashed}) == 6
    assert prefix_hashes(prompt, block, alice.prefix_salt()) == prefix_hashes(
        prompt, block, alice.prefix_salt()
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_concurrency_limit_429_with_headers_and_release():
    limiter, tenant = RateLimiter(Clock()), Tenant("a", TenantLimits(max_concurrent=2))
    first = limiter.admit(tenant, 1, 10)
    limiter.admit(tenant, 1, 10)
    with pytest.raises(RateLimited) as caught:
        limiter.admit(tenant, 1, 10)
    error = caught.value
    assert error.limit == "requests" and error.headers["Retry-After"] == "1"
    assert error.headers["x-ratelimit-limit-requests"] == "2"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimited):
        limiter.check(tenant)  # the quick check before a body is read
    limiter.release(first)
    limiter.check(tenant)
    limiter.release(first)  # twice: counted once
    assert limiter.running(tenant) == 1
    limiter.admit(tenant, 1, 10)
    with pytest.raises(TooLarge):
        limiter.admit(tenant, 3, 10)  # could never run
    other = Tenant("b", TenantLimits(max_concurrent=1))
    limiter.admit(other, 1, 1)  # a's limit is a's alone


def test_tokens_per_minute_bucket_refills_and_counts_generated_tokens():
    clock = Clock()
    limiter, tenant = RateLimiter(clock), Tenant("a", TenantLimits(tokens_per_minute=600))
    limiter.admit(tenant, 1, 500)
    limiter.charge(tenant, 50)  # generated
    assert limiter.headers(tenant)["x-ratelimit-remaining-tokens"] == "50"
    with pytest.raises(RateLimited) as caught:
        limiter.admit(tenant, 1, 100)
    assert caught.value.limit == "tokens" and 5.0 <= caught.value.retry_after <= 5.01
    assert caught.value.headers["Retry-After"] == "5"
    assert caught.value.headers["x-ratelimit-reset-tokens"] == "55s"
    clock.now += 5.0  # 10 tokens a second
    limiter.admit(tenant, 1, 100)
    with pytest.raises(TooLarge):
        limiter.admit(tenant, 1, 601)
    clock.now += 3600
    assert limiter.headers(tenant)["x-ratelimit-remaining-tokens"] == "600"  # capped
    assert limiter.headers(Tenant("free")) == {}


def test_a_changed_limit_takes_effect_at_once():
    limiter = RateLimiter(Clock())
    limiter.admit(Tenant("a", TenantLimits(tokens_per_minute=100)), 1, 100)
    limiter.admit(Tenant("a", TenantLimits(tokens_per_minute=1000)), 1, 900)


def test_tenant_metrics_cap_their_labels():
    registry = CollectorRegistry()
    metrics = TenantMetrics(registry, "m", max_labels=2)
    for name in ("a", "b", "c", "d"):
        metrics.request(name, 5)
        metrics.generated(name, 3)
        metrics.rate_limited(name, "tokens")
    text = generate_latest(registry).decode()
    assert 'tenant="a"' in text and 'tenant="b"' in text and 'tenant="c"' not in text
    assert 'lln:tenant_requests_total{model_name="m",tenant="other"} 2.0' in text
    assert 'lln:tenant_prompt_tokens_total{model_name="m",tenant="a"} 5.0' in text
    assert 'lln:tenant_rate_limited_total{limit="tokens",model_name="m",tenant="other"} 2.0' in text


def test_redis_options_and_their_checks(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cret pass\n")
    assert redis_options(str(secret)) == {"password": "s3cret pass"}
    tls = redis_options(None, "ca.pem", "client.pem", "client.key")
    assert tls == {"ssl_ca_certs": "ca.pem", "ssl_certfile": "client.pem",
                   "ssl_keyfile": "client.key", "ssl_cert_reqs": "required"}  # fmt: skip
    with pytest.raises(ValueError, match="password file"):
        redis_options(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="need a rediss://"):
        EngineConfig(state_store="redis://h/0", state_store_ca_cert="ca.pem")
    with pytest.raises(ValueError, match="go together"):
        EngineConfig(state_store="rediss://h/0", state_store_cert="c.pem")
    with pytest.raises(ValueError, match="needs a Redis"):
        EngineConfig(state_store_password_file=str(secret))
    with pytest.raises(ValueError) as caught:
        EngineConfig(state_store="http://:hunter2@h/0")
    assert "hunter2" not in str(caught.value)
    assert redacted_url("rediss://:pw@h:6380/0?x=1") == "rediss://:***@h:6380/0?x=1"
    assert redacted_url("redis://user:pw@h/0") == "redis://user:***@h/0"
    assert redacted_url("redis://h/0") == "redis://h/0"
    with pytest.raises(ValueError, match="max_tenant_labels"):
        ServerConfig(max_tenant_labels=0)


@pytest.mark.parametrize(
    ("text", "message"), [("", "no keys"), ("sk-same-0001 a\nsk-same-0001 b\n", "the same key")]
)
def test_serve_with_a_bad_keys_file_exits_with_a_message(tmp_path, capsys, text, message):
    keys = tmp_path / "keys"
    keys.write_text(text)
    args = build_parser().parse_args(["serve", "--api-keys-file", str(keys)])
    assert args.api_keys_file == str(keys)
    assert run_serve(args) == 2  # before any model is loaded or port opened
    stderr = capsys.readouterr().err
    assert message in stderr and "sk-same" not in stderr and "Traceback" not in stderr
