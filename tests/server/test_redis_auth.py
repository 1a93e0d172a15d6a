"""The Redis state store against a real redis-server that asks for a password
(`requirepass`), and one that speaks only TLS and asks for a client certificate
(certificates made here by openssl): the password from the URL or from a file, TLS from
redis-py's URL options or from the --state-store-* files; a wrong password or an unverified
server leaves the store unavailable, with a message that does not hold the password."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from server.state_store import Session, StoreUnavailableError, redis_options
from server.state_store.codec import state_tag
from server.state_store.redis_store import RedisStore
from tests.models.conftest import tiny_model
from tests.server.conftest import free_port, start_redis, stop_redis

PASSWORD = "pa ss:w@rd/1"  # characters a URL must escape
URL_PASSWORD = "pa%20ss%3Aw%40rd%2F1"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path) -> dict[str, str]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=lln-test-ca", cwd=directory)  # fmt: skip
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN=lln-test-{name}", cwd=directory)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", "san.ext",
                cwd=directory)  # fmt: skip
    return {n: str(directory / n) for n in ("ca.crt", "server.crt", "server.key", "client.crt",
                                            "client.key")}  # fmt: skip


class SecureRedis:
    """redis-server with requirepass, listening on a plain port and (tls) on a TLS port."""

    def __init__(self, binary: str, directory: Path, certs: dict[str, str] | None) -> None:
        self.port, self.tls_port = free_port(), free_port()
        args = ["--requirepass", PASSWORD]
        if certs is not None:
            args += ["--tls-port", str(self.tls_port), "--tls-cert-file", certs["server.crt"],
                     "--tls-key-file", certs["server.key"], "--tls-ca-cert-file",
                     certs["ca.crt"], "--tls-auth-clients", "yes"]  # fmt: skip
        self.process = start_redis(binary, directory, self.port, args, password=PASSWORD)

    def stop(self) -> None:
        stop_redis(self.process)


def tls_supported(binary: str) -> bool:
    """Whether this redis-server was built with TLS (Debian's is: it links libssl)."""
    try:
        linked = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=20)
    except OSError:
        return True  # cannot tell: try, and fail loudly if it does not
    return "libssl" in linked.stdout


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found: it makes the test certificates")
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def secure_redis(redis_binary, certificates, tmp_path_factory):
    if not tls_supported(redis_binary):
        pytest.skip("this redis-server was built without TLS")
    server = SecureRedis(redis_binary, tmp_path_factory.mktemp("redis-tls"), certificates)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model():
    return tiny_model("lln_diag", dtype=torch.float32, vocab_size=29, local_size=4, num_sinks=1)


def open_store(model, url: str, **options) -> RedisStore:
    template = model.empty_states(1)
    return RedisStore(url, state_tag(model, "tiny", template), template, ttl_s=60,
                      timeout_s=2.0, options=options)  # fmt: skip


def round_trip(store: RedisStore, session_id: str) -> None:
    """A session saved and read back through `store`."""
    assert store.is_available, store.last_error
    assert store.acquire(session_id) is None
    states = store.template
    store.release(session_id, Session(states, [3], 5, sum(s.nbytes for s in states)))
    assert store.info(session_id).num_tokens == 5
    assert store.delete(session_id)


def test_a_password_in_the_url_or_from_a_file(model, secure_redis, tmp_path):
    with_url = open_store(model, f"redis://:{URL_PASSWORD}@127.0.0.1:{secure_redis.port}/0")
    round_trip(with_url, "url")
    with_url.close()
    secret = tmp_path / "redis-password"
    secret.write_text(PASSWORD + "\n")  # as `kubectl create secret --from-file` may leave it
    from_file = open_store(model, f"redis://127.0.0.1:{secure_redis.port}/0",
                           **redis_options(str(secret)))  # fmt: skip
    round_trip(from_file, "file")
    from_file.close()


@pytest.mark.parametrize("password", [None, "wrong"])
def test_no_or_a_wrong_password_leaves_the_store_unavailable(model, secure_redis, password):
    auth = "" if password is None else f":{password}@"
    store = open_store(model, f"redis://{auth}127.0.0.1:{secure_redis.port}/0")
    try:
        assert not store.is_available
        with pytest.raises(StoreUnavailableError) as caught:
            store.acquire("s")
        assert "wrong" not in str(caught.value) and PASSWORD not in str(caught.value)
        assert "127.0.0.1" in str(caught.value)
    finally:
        store.close()


def test_tls_with_a_client_certificate_from_options_or_the_url(model, secure_redis, certificates):
    base = f"rediss://:{URL_PASSWORD}@127.0.0.1:{secure_redis.tls_port}/0"
    options = redis_options(None, certificates["ca.crt"], certificates["client.crt"],
                            certificates["client.key"])  # fmt: skip
    store = open_store(model, base, **options)
    round_trip(store, "tls")
    store.close()
    query = (f"?ssl_ca_certs={certificates['ca.crt']}&ssl_certfile={certificates['client.crt']}"
             f"&ssl_keyfile={certificates['client.key']}&ssl_cert_reqs=required")  # fmt: skip
    by_url = open_store(model, base + query)  # redis-py's own URL parsing
    round_trip(by_url, "tls-url")
    by_url.close()


def test_tls_refuses_an_unverified_server_or_a_client_without_certificate(
    model, secure_redis, certificates
):
    base = f"rediss://:{URL_PASSWORD}@127.0.0.1:{secure_redis.tls_port}/0"
    unverified = open_store(model, base)  # the system's CAs do not know the test CA
    no_client_cert = open_store(model, base, **redis_options(None, certificates["ca.crt"]))
    plain_to_tls = open_store(model, f"redis://:{URL_PASSWORD}@127.0.0.1:{secure_redis.tls_port}")
    for store in (unverified, no_client_cert, plain_to_tls):
        try:
            assert not store.is_available
            assert PASSWORD not in store.last_error
        finally:
            store.close()
