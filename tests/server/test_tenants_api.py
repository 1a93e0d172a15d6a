"""Two tenants through the HTTP API on a tiny random model (in process): sessions and prefix
states kept apart (cache_salt too), 429s with OpenAI's headers for the tenant over its limit
only, per-tenant metrics, and hostile keys: clean 4xx, never a 5xx."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from server.api import ServerState, build_app
from server.tenants import TenantRegistry
from tests.server.test_api import MODEL, make_model, serving_model, tokenizer  # noqa: F401 (fixture)

ALICE, BOB, CAROL = "sk-alice-000001", "sk-bob-0000001", "sk-carol-000001"
KEYS = f"""{ALICE} alice
{BOB} bob
{CAROL} carol max_concurrent=1 tokens_per_minute=60
"""
PROMPT = "abcdefghijklmn"  # 14 tokens: 3 blocks of 4 can be cached


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture
def server(model, tokenizer, tmp_path):  # noqa: F811 (the fixture imported)
    keys = tmp_path / "keys"
    keys.write_text(KEYS)
    with serving_model(model, tokenizer, tenants=TenantRegistry(keys_file=keys)) as running:
        yield running


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def complete(client, key: str, **fields):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0,
            "ignore_eos": True, **fields}  # fmt: skip
    return client.post("/v1/completions", json=body, headers=auth(key))


def cached(response) -> int:
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_another_tenants_session_is_not_found_for_get_delete_and_continuation(server):
    client, _ = server
    assert complete(client, ALICE, prompt="abcdef", session_id="s").status_code == 200
    mine = client.get("/v1/sessions/s", headers=auth(ALICE)).json()
    assert mine["num_tokens"] == 6 + 3
    theirs = client.get("/v1/sessions/s", headers=auth(BOB))
    never = client.get("/v1/sessions/never", headers=auth(BOB))
    assert theirs.status_code == never.status_code == 404  # existence does not leak
    assert theirs.json()["error"] == {**never.json()["error"], "message": "no saved session 's'"}
    assert client.delete("/v1/sessions/s", headers=auth(BOB)).status_code == 404
    info = client.get("/v1/state_info", params={"session_id": "s"}, headers=auth(BOB))
    assert info.status_code == 404
    # continuing it is starting a session of one's own: nothing of alice's state is used
    bobs = complete(client, BOB, prompt="gh", session_id="s")
    assert cached(bobs) == 0 and bobs.json()["usage"]["prompt_tokens"] == 2
    assert client.get("/v1/sessions/s", headers=auth(BOB)).json()["num_tokens"] == 2 + 3
    after = client.get("/v1/sessions/s", headers=auth(ALICE)).json()
    assert after.pop("last_used") == pytest.approx(mine.pop("last_used"), abs=1e-3)
    assert after == mine
    again = complete(client, ALICE, prompt="gh", session_id="s")
    assert cached(again) == 6 + 3 - 1  # alice's own history, untouched by bob
    assert client.delete("/v1/sessions/s", headers=auth(ALICE)).status_code == 200
    assert client.get("/v1/sessions/s", headers=auth(BOB)).status_code == 200


def test_prefix_states_are_not_shared_across_tenants_or_cache_salts(server):
    client, _ = server
    assert cached(complete(client, ALICE)) == 0
    assert cached(complete(client, ALICE)) == 12  # full within one tenant
    assert cached(complete(client, BOB)) == 0  # across tenants: nothing
    assert cached(complete(client, ALICE, cache_salt="x")) == 0
    assert cached(complete(client, ALICE, cache_salt="x")) == 12
    assert cached(complete(client, BOB, cache_salt="x")) == 0  # a salt does not cross tenants
    chat = {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}
    first = client.post("/v1/chat/completions", json=chat, headers=auth(ALICE))
    second = client.post("/v1/chat/completions", json=chat, headers=auth(BOB))
    assert cached(first) == 0 and cached(second) == 0
    empty = complete(client, ALICE, cache_salt="")
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "cache_salt"


def test_the_tenant_over_its_limit_gets_429s_with_headers_the_others_are_served(server):
    client, state = server
    carol = state.tenants.authenticate(CAROL)
    ok = complete(client, CAROL, prompt="ab", max_tokens=2)
    assert ok.status_code == 200
    assert ok.headers["x-ratelimit-limit-requests"] == "1"
    assert ok.headers["x-ratelimit-limit-tokens"] == "60"
    assert int(ok.headers["x-ratelimit-remaining-tokens"]) <= 60 - 2
    assert "x-ratelimit-limit-requests" not in complete(client, ALICE).headers
    held = state.limiter.admit(carol, 1, 0)  # a request of carol's still running
    busy = complete(client, CAROL, prompt="ab", max_tokens=2)
    assert busy.status_code == 429, busy.text
    body = busy.json()["error"]
    assert body["code"] == 429 and body["type"] == "requests"
    assert busy.headers["retry-after"] == "1"
    assert busy.headers["x-ratelimit-remaining-requests"] == "0"
    unread = client.post("/v1/completions", content=b"{not json", headers=auth(CAROL))
    assert unread.status_code == 429  # refused before its body is read: a flood costs little
    assert complete(client, ALICE).status_code == 200  # others keep their share
    assert complete(client, BOB).status_code == 200
    state.limiter.release(held)
    assert state.limiter.running(carol) == 0  # every response gave its lease back
    assert complete(client, CAROL, prompt="a" * 40, max_tokens=2).status_code == 200
    tokens = complete(client, CAROL, prompt="a" * 40, max_tokens=2)  # 14 of 60 left
    assert tokens.status_code == 429 and tokens.json()["error"]["type"] == "tokens"
    assert int(tokens.headers["retry-after"]) >= 1
    assert "x-ratelimit-reset-tokens" in tokens.headers
    too_big = complete(client, CAROL, prompt="a" * 61)
    assert too_big.status_code == 400 and "tokens per minute" in too_big.json()["error"]["message"]
    assert complete(client, CAROL, prompt="ab", n=2).status_code == 400  # 2 at once: never
    metrics = client.get("/metrics").text
    assert (
        'lln:tenant_rate_limited_total{limit="requests",model_name="tiny",tenant="carol"} 2.0'
        in (metrics)
    )
    assert 'lln:tenant_requests_total{model_name="tiny",tenant="alice"}' in metrics
    assert 'lln:tenant_generation_tokens_total{model_name="tiny",tenant="bob"} 3.0' in metrics


def test_a_streamed_request_gives_its_lease_back(server):
    client, state = server
    body = {"model": MODEL, "prompt": "ab", "max_tokens": 3, "stream": True}
    with client.stream("POST", "/v1/completions", json=body, headers=auth(CAROL)) as response:
        assert response.status_code == 200
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        assert list(response.iter_lines())[-2] == "data: [DONE]"
    deadline = time.monotonic() + 5
    while state.limiter.running(state.tenants.authenticate(CAROL)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state.limiter.running(state.tenants.authenticate(CAROL)) == 0


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", f"Basic {ALICE}", f"Bearer {ALICE}x", f"Bearer {ALICE[:-1]}",
     f"Bearer {ALICE} extra", "Bearer sk alice 000001", "Bearer \u00e9t\u00e9-key-0".encode(),
     b"Bearer \xff\xfe-key-0000", "x" * 8000],
)  # fmt: skip
def test_hostile_keys_get_a_clean_401(server, header):
    client, _ = server
    headers = {} if header is None else {"Authorization": header}
    for method, path in (("GET", "/v1/models"), ("GET", "/v1/sessions/s"),
                         ("POST", "/v1/completions"), ("DELETE", "/v1/sessions/s")):  # fmt: skip
        response = client.request(method, path, headers=headers, json={})
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["type"] == "authentication_error"


def test_thousands_of_wrong_keys_then_the_right_one(server):
    client, _ = server
    started = time.perf_counter()
    for i in range(2000):
        assert client.get("/v1/models", headers=auth(f"sk-guess-{i:06d}")).status_code == 401
    wrong = (time.perf_counter() - started) / 2000
    started = time.perf_counter()
    assert client.get("/v1/models", headers=auth(ALICE)).status_code == 200
    assert time.perf_counter() - started < max(0.5, 50 * wrong)


def test_a_session_id_with_control_characters_is_a_400(server):
    client, _ = server
    response = complete(client, ALICE, session_id="bob\x1fs")
    assert response.status_code == 400 and response.json()["error"]["param"] == "session_id"
    assert client.get("/v1/sessions/a%1Fb", headers=auth(ALICE)).status_code == 400


def test_refusals_before_routing_carry_the_cors_headers():
    state = ServerState(model_names=[MODEL], api_key="sk-the-only-key")
    with TestClient(build_app(state, ["http://page.example"])) as client:
        headers = {"Origin": "http://page.example", "Authorization": "Bearer wrong"}
        response = client.post("/v1/completions", json={}, headers=headers)
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == "http://page.example"
