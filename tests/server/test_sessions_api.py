"""Sessions through the HTTP API on a tiny random model, in process and in a real Redis:
GET / DELETE, replicas sharing Redis, states of another model refused (409), Redis going away
(503 for session requests, plain requests served, health degraded) and coming back."""

from __future__ import annotations

import time

import pytest
import redis
import torch
from fastapi.testclient import TestClient

from server.api import ServerState, build_app
from server.async_engine import AsyncEngine
from server.metrics import Metrics
from tests.models.conftest import tiny_model
from tests.server.test_api import MODEL, TEMPLATE, complete
from tests.server.test_engine import VOCAB, greedy_alone, make_engine


def make_model(local_size: int = 4, seed: int = 0):
    return tiny_model("lln_diag", dtype=torch.float32, vocab_size=VOCAB, local_size=local_size,
                      num_sinks=1, seed=seed)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture
def tokenizer(char_tokenizer):
    char_tokenizer.chat_template = TEMPLATE
    return char_tokenizer


class Replica:
    """One server (engine + app) on `model`, its sessions in `store`."""

    def __init__(self, model, tokenizer, store: str | None, share: bool = False) -> None:
        engine = make_engine(model, tokenizer, max_num_seqs=4, max_num_batched_tokens=16,
                             state_store=store, session_lock_ttl_s=2.0,
                             share_prefix_states=share)  # fmt: skip
        self.state = ServerState(model_names=[MODEL], api_key=None, max_body_bytes=4096)
        self.state.metrics = Metrics(engine, MODEL)
        self.state.engine = AsyncEngine(engine).start()
        self.client = TestClient(build_app(self.state))

    def close(self) -> None:
        self.client.close()
        self.state.engine.shutdown()


@pytest.fixture
def replicas(model, tokenizer, redis_url):
    made = []

    def make(store: str | None = redis_url, model=model, share: bool = False) -> Replica:
        made.append(Replica(model, tokenizer, store, share))
        return made[-1]

    yield make
    for replica in made:
        replica.close()


def turn(client, prompt: str, session: str, max_tokens: int = 4):
    return complete(client, prompt=prompt, session_id=session, max_tokens=max_tokens,
                    ignore_eos=True)  # fmt: skip


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_get_and_delete_a_session(replicas, backend):
    client = (replicas(None) if backend == "memory" else replicas()).client
    missing = client.get("/v1/sessions/s")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == 404
    assert turn(client, "abcdef", "s").status_code == 200
    info = client.get("/v1/sessions/s").json()
    assert info["object"] == "session" and info["num_tokens"] == 6 + 4
    assert info["bytes"] > 0 and not info["in_use"] and abs(info["last_used"] - time.time()) < 30
    assert info["store"] == backend
    deleted = client.delete("/v1/sessions/s").json()
    assert deleted == {"id": "s", "object": "session.deleted", "deleted": True}
    assert client.delete("/v1/sessions/s").status_code == 404
    assert client.get("/v1/sessions/" + "x" * 300).status_code == 400


def test_a_conversation_alternating_between_replicas_equals_one_run(replicas, model, tokenizer):
    a, b = replicas().client, replicas().client
    history: list[int] = []
    for i, text in enumerate(["abcdef", "gh", "ijk", "l"]):
        response = turn(a if i % 2 == 0 else b, text, "conv").json()
        history += tokenizer(text, add_special_tokens=False).input_ids
        expected = greedy_alone(model, history, 4)
        assert response["choices"][0]["text"] == tokenizer.decode(
            expected, skip_special_tokens=True
        )
        if i:  # only the new text and the pending token were prefilled
            assert response["usage"]["prompt_tokens"] == len(text) + 1
            cached = response["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert cached == len(history) - len(text) - 1
        history += expected


def test_a_state_of_another_model_or_shape_is_a_409(replicas):
    writer = replicas().client
    assert turn(writer, "abcdef", "s").status_code == 200
    for other in (make_model(seed=1), make_model(local_size=6)):
        reader = replicas(model=other).client
        response = turn(reader, "gh", "s")
        assert response.status_code == 409, response.text
        assert "saved by another" in response.json()["error"]["message"]
    assert turn(writer, "gh", "s").status_code == 200  # refused, never loaded or lost


def test_redis_down_503_for_sessions_plain_requests_served_then_back(replicas, redis_process):
    replica = replicas()
    client = replica.client
    assert turn(client, "abcdef", "s").status_code == 200
    redis_process.stop()
    try:
        response = turn(client, "gh", "s")
        assert response.status_code == 503, response.text
        assert "unreachable" in response.json()["error"]["message"]
        assert complete(client, prompt="abc").status_code == 200
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        assert health.json()["state_store"]["status"] == "unavailable"
        assert client.get("/v1/sessions/s").status_code == 503
        assert "lln:state_store_up" in client.get("/metrics").text
    finally:
        redis_process.start()
    deadline = time.monotonic() + 10
    while client.get("/health").json()["status"] != "ok":
        assert time.monotonic() < deadline, "the server did not reconnect"
        time.sleep(0.2)
    response = turn(client, "gh", "s")
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 6 + 4 - 1


def test_shared_prefix_state_is_a_hit_on_another_replica(replicas, model, tokenizer, redis_url):
    a, b = replicas(share=True).client, replicas(share=True).client
    assert complete(a, prompt="abcdefghij").status_code == 200
    keys = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 10
    while len(keys.keys("lln:p:*")) < 2:  # after 4 and 8 tokens (the prefill chunk size)
        assert time.monotonic() < deadline, "the prefix states were not shared"
        time.sleep(0.05)
    body = complete(b, prompt="abcdefghxy", ignore_eos=True).json()
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 8
    ids = tokenizer("abcdefghxy", add_special_tokens=False).input_ids
    assert body["choices"][0]["text"] == tokenizer.decode(
        greedy_alone(model, ids, 5), skip_special_tokens=True
    )


def test_a_continued_chat_session_in_redis_renders_only_its_new_turns(replicas, tokenizer):
    """The playground's chat session across two replicas sharing Redis: the second turn is
    rendered after the earlier answer (its closing, not the template's opening again), from
    the pending token that the store's info record holds; /v1/state_info reports the session."""
    from tests.server.test_playground import OPENING

    tokenizer.chat_template = OPENING
    a, b = replicas().client, replicas().client
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "session_id": "c"}  # fmt: skip

    def say(client, text: str) -> dict:
        messages = [{"role": "user", "content": text}]
        response = client.post("/v1/chat/completions", json={**body, "messages": messages})
        assert response.status_code == 200, response.text
        return response.json()["usage"]

    first, second = say(a, "hi"), say(b, "there")
    assert first["prompt_tokens"] == len("sys u hi e a ")
    assert second["prompt_tokens"] == 1 + len(" e u there e a ")
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert cached == len("sys u hi e a ") + 4 - 1
    info = a.get("/v1/state_info?session_id=c").json()["session"]
    assert info["num_tokens"] == cached + second["prompt_tokens"] + second["completion_tokens"]
    assert info["state_bytes"] == b.get("/v1/sessions/c").json()["bytes"]


def test_redis_down_a_chat_session_is_a_503_not_a_500(replicas, tokenizer, redis_process):
    """Rendering a continued chat asks the store first; unreachable, the chat is rendered whole
    and the session's own load answers 503, as for completions."""
    client = replicas().client
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "session_id": "c",
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    redis_process.stop()
    try:
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 503, response.text
        assert client.get("/v1/state_info?session_id=c").status_code == 503
        assert client.get("/v1/state_info").status_code == 200
    finally:
        redis_process.start()
