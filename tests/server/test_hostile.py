"""Hostile input: a schema fuzzer (schemathesis, from the app's own OpenAPI document, fixed
seed, bounded examples) and hand-written attacks. Every one gets a 4xx with an OpenAI error
body, or a valid answer; never a 5xx, a hang or a dead server."""

import json
import socket
import threading
import time

import httpx
import pytest
import schemathesis
import torch
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from server.api import ServerState, build_app
from server.async_engine import AsyncEngine
from tests.conftest import make_char_tokenizer
from tests.models.conftest import tiny_model
from tests.server.test_engine import VOCAB, make_engine

MODEL = "tiny"
MAX_BODY = 16_384


def make_state() -> ServerState:
    tokenizer = make_char_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=VOCAB, local_size=4,
                       num_sinks=1)  # fmt: skip
    engine = make_engine(model, tokenizer, max_num_seqs=4, max_num_batched_tokens=32,
                         max_model_len=256, default_max_tokens=16)  # fmt: skip
    state = ServerState(model_names=[MODEL], max_body_bytes=MAX_BODY)
    state.engine = AsyncEngine(engine)
    return state


STATE = make_state()
APP = build_app(STATE)
# Building a model turns on flush-to-zero for speed (`enable_flush_denormal`); hypothesis
# refuses to generate floats under it, so it is off while this module's examples are made.
torch.set_flush_denormal(False)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def running_engine():
    STATE.engine.start()
    yield
    STATE.engine.shutdown()


@pytest.fixture(autouse=True)
def no_flush_to_zero():
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(True)


@schema.parametrize()
@settings(
    max_examples=40,
    derandomize=True,  # a fixed seed: the same examples in every run
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_schema_fuzz(case):
    """Requests made from the document: no 5xx, and every response matches the document."""
    case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])


@pytest.fixture(scope="module")
def live_server():
    """The app on a real socket (uvicorn in a thread): for raw bytes and slow clients."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(APP, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", port
    server.should_exit = True
    thread.join(timeout=10)


def post(url: str, path: str, content: bytes | str) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    return httpx.post(url + path, content=content, headers=headers, timeout=30)


def assert_error_body(response: httpx.Response, status: int = 400) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["code"]


def completion(**fields) -> str:
    return json.dumps({"model": MODEL, "max_tokens": 2, "prompt": "ab", **fields})


HOSTILE = {
    "invalid utf-8": b'{"model": "tiny", "prompt": "\xff\xfe\xfa"}',
    "not json": b"{model: tiny",
    "a json list": b"[1, 2, 3]",
    "deep nesting": ("[" * 8000 + "]" * 8000).encode(),  # under the body limit
    "deep nesting in a field": completion(prompt=None)[:-1].replace("null", "[" * 5000 + "]" * 5000)
    + "}",
    "token id out of range": completion(prompt=[1, 2, VOCAB + 5]),
    "negative token id": completion(prompt=[1, -3]),
    "token id as float": completion(prompt=[1, 2.5]),
    "empty nested prompts": completion(prompt=[[]]),
    "empty nested and full": completion(prompt=[[1, 2], []]),
    "huge stop list": completion(stop=["x"] * 1000),
    "empty stop string": completion(stop=[""]),
    "huge session id": completion(session_id="s" * 10_000),
    "wrong type: n": completion(n="three"),
    "wrong type: temperature": completion(temperature=[1]),
    "wrong type: stream": completion(stream="yes"),
    "wrong type: stop": completion(stop=5),
    "wrong type: logprobs": completion(logprobs={"a": 1}),
    "wrong type: seed": completion(seed=1.5),
    "wrong type: logit_bias": completion(logit_bias=[1, 2]),
    "wrong type: stream_options": completion(stream_options=3),
    "wrong type: response_format": completion(response_format="json"),
    "null model": completion(model=None),
    "huge n": completion(n=100_000),
    "huge max_tokens": completion(max_tokens=10**12),
    "huge seed": completion(seed=10**30),
    "nan temperature": completion().replace('"max_tokens"', '"temperature": NaN, "max_tokens"'),
    "infinite top_p": completion().replace('"max_tokens"', '"top_p": Infinity, "max_tokens"'),
}


@pytest.mark.parametrize("body", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_completions_are_4xx_and_the_server_keeps_serving(live_server, body):
    url, _ = live_server
    response = post(url, "/v1/completions", body)
    assert_error_body(response, 400)
    assert post(url, "/v1/completions", completion()).status_code == 200


def test_hostile_chat_bodies(live_server):
    url, _ = live_server
    bodies = [
        {"messages": []},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
        {"messages": [{"role": "user", "content": [[[[[]]]]]}]},
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50, "logprobs": True},
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -1},
    ]
    for body in bodies:
        response = post(url, "/v1/chat/completions", json.dumps({"model": MODEL, **body}))
        assert_error_body(response, 400)


def test_a_body_at_the_size_limit_is_served_and_one_byte_more_is_413(live_server):
    url, _ = live_server
    body = completion(max_tokens=1)
    body = "{" + " " * (MAX_BODY - len(body)) + body[1:]  # JSON whitespace up to the limit
    assert len(body.encode()) == MAX_BODY
    assert post(url, "/v1/completions", body).status_code == 200
    assert_error_body(post(url, "/v1/completions", body + " "), 413)


def test_a_slow_client_does_not_hold_up_others(live_server):
    """A client that sends half a body and stalls (slowloris) ties up only its own
    connection: other requests are answered meanwhile, and its request fails cleanly."""
    url, port = live_server
    body = completion().encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
        slow.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        began = time.monotonic()
        for _ in range(3):
            assert post(url, "/v1/completions", completion()).status_code == 200
        assert time.monotonic() - began < 20
        slow.sendall(b"x" * (len(body) - 10))  # the rest, but not JSON
        reply = slow.recv(65536).decode(errors="replace")
    assert reply.startswith("HTTP/1.1 400")
    assert STATE.engine.engine.num_running == 0
