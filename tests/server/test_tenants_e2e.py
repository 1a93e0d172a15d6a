"""Two tenants through the `openai` SDK against `lln-serve serve` as a process (tiny random
model), its sessions in a real redis-server over TLS with a password from a file: one tenant
cannot read, continue or delete the other's session, prefix states are not shared, 429s only
for the tenant over its limit, the keys file reloaded on SIGHUP under traffic with no failed
request; hostile input (a 1 MB header, ten thousand wrong keys) gets clean 4xx answers, never a
5xx or a traceback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time

import httpx
import openai
import pytest

from tests.server.conftest import ServeProcess
from tests.server.test_playground_browser import tiny_checkpoint
from tests.server.test_redis_auth import (  # noqa: F401 (fixtures)
    PASSWORD,
    certificates,
    secure_redis,
)

ALICE, BOB, CAROL = "sk-alice-e2e-0001", "sk-bob-e2e-00001", "sk-carol-e2e-0001"
KEYS = f"{ALICE} alice\n{BOB} bob max_concurrent=1\n"
PROMPT = "the quick brown"  # 15 tokens: 3 cached blocks of 4


@pytest.fixture(scope="module")
def server(tmp_path_factory, secure_redis, certificates):  # noqa: F811
    directory = tmp_path_factory.mktemp("tenants")
    keys = directory / "keys"
    keys.write_text(KEYS)
    secret = directory / "redis-password"
    secret.write_text(PASSWORD + "\n")
    checkpoint = tiny_checkpoint(directory / "tiny")
    args = ["--model", str(checkpoint), "--served-model-name", "tiny", "--compile", "0",
            "--max-num-seqs", "4", "--prefill-chunk-size", "4", "--api-keys-file", str(keys),
            "--state-store", f"rediss://127.0.0.1:{secure_redis.tls_port}/0",
            "--state-store-password-file", str(secret),
            "--state-store-ca-cert", certificates["ca.crt"],
            "--state-store-cert", certificates["client.crt"],
            "--state-store-key", certificates["client.key"]]  # fmt: skip
    process = ServeProcess(args, {"OMP_NUM_THREADS": "1"}).wait_ready(180)
    process.keys = keys
    health = httpx.get(f"{process.url}/health", timeout=10).json()
    assert health["state_store"] == {"kind": "redis", "status": "ok"}, health
    yield process
    process.stop()


def sdk(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def complete(client: openai.OpenAI, prompt: str = PROMPT, max_tokens: int = 3, **extra):
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, extra_body=extra)  # fmt: skip


def cached(completion) -> int:
    return completion.usage.prompt_tokens_details.cached_tokens


def session(server, key: str, session_id: str, method: str = "GET") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.request(method, f"{server.url}/v1/sessions/{session_id}", headers=headers)


def test_one_tenant_cannot_read_continue_or_delete_anothers_session(server):
    alice, bob = sdk(server, ALICE), sdk(server, BOB)
    complete(alice, "hello there", session_id="conv")
    mine = session(server, ALICE, "conv").json()
    assert mine["num_tokens"] == 11 + 3 and mine["store"] == "redis"
    for method in ("GET", "DELETE"):
        theirs, never = session(server, BOB, "conv", method), session(server, BOB, "no", method)
        assert theirs.status_code == never.status_code == 404
        assert theirs.json()["error"]["type"] == never.json()["error"]["type"]
    continued = complete(bob, "hi", session_id="conv")  # a new session of bob's own
    assert cached(continued) == 0 and continued.usage.prompt_tokens == 2
    assert session(server, ALICE, "conv").json()["num_tokens"] == mine["num_tokens"]
    assert cached(complete(alice, " and", session_id="conv")) == 14 - 1
    with pytest.raises(openai.AuthenticationError):
        complete(sdk(server, "sk-not-a-key-000"))


def test_prefix_states_are_not_shared_between_tenants(server):
    alice, bob = sdk(server, ALICE), sdk(server, BOB)
    prompt = "prefix " + PROMPT
    assert cached(complete(alice, prompt)) == 0
    assert cached(complete(alice, prompt)) == 20  # all its blocks but the last token's
    assert cached(complete(bob, prompt)) == 0
    assert cached(complete(alice, prompt, cache_salt="s1")) == 0


def test_429s_only_for_the_tenant_over_its_limit(server):
    alice, bob = sdk(server, ALICE), sdk(server, BOB)
    body = {"model": "tiny", "prompt": "ab", "max_tokens": 100000, "stream": True,
            "ignore_eos": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {BOB}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers,
                      timeout=60) as running:  # fmt: skip
        assert running.status_code == 200
        lines = running.iter_lines()  # kept: a dropped iterator closes the connection
        assert next(line for line in lines if line.startswith("data: "))
        with pytest.raises(openai.RateLimitError) as caught:
            complete(bob)
        response = caught.value.response
        assert response.headers["retry-after"] == "1"
        assert response.headers["x-ratelimit-limit-requests"] == "1"
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert complete(alice).choices[0].text  # alice keeps her share
    deadline = time.monotonic() + 10  # bob's stream closed: its lease is back
    while time.monotonic() < deadline:
        try:
            complete(bob)
            break
        except openai.RateLimitError:
            time.sleep(0.1)
    else:
        pytest.fail("bob's lease was not given back")
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'lln:tenant_rate_limited_total{limit="requests",model_name="tiny",tenant="bob"}' in (
        metrics
    )


def test_keys_file_reload_under_traffic_fails_no_request(server):
    alice = sdk(server, ALICE)
    failures, done, count = [], threading.Event(), [0]

    def traffic():
        while not done.is_set():
            try:
                complete(alice, "ab", max_tokens=2)
                count[0] += 1
            except Exception as error:  # any failure counts
                failures.append(repr(error))

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for worker in workers:
        worker.start()
    try:
        for i, text in enumerate([KEYS + f"{CAROL} carol\n", "", "sk-dup-000001\n" * 2,
                                  f"{ALICE} alice\n{CAROL} carol\n"]):  # fmt: skip
            (server.keys.parent / "keys.new").write_text(text)
            os.replace(server.keys.parent / "keys.new", server.keys)
            server.process.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            if i == 0:
                assert complete(sdk(server, CAROL)).choices
    finally:
        done.set()
        for worker in workers:
            worker.join(timeout=60)
    assert not failures and count[0] > 0
    with pytest.raises(openai.AuthenticationError):
        complete(sdk(server, BOB))  # removed by the last file
    assert complete(sdk(server, CAROL)).choices
    server.keys.write_text(KEYS)  # as the other tests expect
    server.process.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    log = server.stderr_tail()
    assert "the keys file was not reloaded" in log and "Traceback" not in log


def huge_header_answer(port: int) -> bytes:
    """What the server answers to a 1 MB Authorization header (read while it is being sent:
    the server answers and closes without reading the rest, so the send ends in a reset)."""
    received: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:

        def read() -> None:
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    received.append(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + b"k" * 2**20 + b"\r\n\r\n")  # fmt: skip
        reader.join(30)
    return b"".join(received)


def test_a_huge_header_gets_a_clean_400_and_the_server_goes_on(server):
    assert huge_header_answer(server.port).startswith(b"HTTP/1.1 400 ")  # uvicorn's h11 limit
    headers = {"Authorization": "Bearer " + "k" * 12000}
    long_key = httpx.get(f"{server.url}/v1/models", headers=headers)
    assert long_key.status_code == 401  # under the limit: a key, wrong
    assert httpx.get(f"{server.url}/health").status_code == 200


@pytest.mark.slow  # ten thousand requests: 10-15 s on two busy cores
def test_ten_thousand_wrong_keys_in_a_row_then_the_right_one_unslowed(server):
    def right_key_seconds(client: httpx.Client) -> float:
        started = time.perf_counter()
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {ALICE}"}).is_success
        return time.perf_counter() - started

    with httpx.Client(base_url=server.url, timeout=30) as client:
        before = min(right_key_seconds(client) for _ in range(5))
        statuses: dict[int, int] = {}
        for i in range(10_000):
            wrong = {"Authorization": f"Bearer sk-guess-{i:08d}"}
            status = client.get("/v1/models", headers=wrong).status_code
            statuses[status] = statuses.get(status, 0) + 1
        after = min(right_key_seconds(client) for _ in range(5))
    assert statuses == {401: 10_000}
    assert after < max(0.05, 5 * before)
    assert "Traceback" not in server.stderr_tail()
