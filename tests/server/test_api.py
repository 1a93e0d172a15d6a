"""The HTTP API on a tiny random model: OpenAI shapes, streaming, errors, auth, metrics."""

import contextlib
import json

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.api import ServerState, build_app
from server.async_engine import AsyncEngine
from server.metrics import Metrics
from tests.models.conftest import tiny_model
from tests.server.test_engine import VOCAB, greedy_alone, make_engine

MODEL = "tiny"
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"


@pytest.fixture
def tokenizer(char_tokenizer):
    char_tokenizer.chat_template = TEMPLATE
    return char_tokenizer


def make_model():
    """The tiny random model the API tests serve."""
    return tiny_model("lln_diag", dtype=torch.float32, vocab_size=VOCAB, local_size=4, num_sinks=1)


@pytest.fixture
def model():
    return make_model()


@pytest.fixture
def server(model, tokenizer):
    with serving_model(model, tokenizer) as running:
        yield running


@contextlib.contextmanager
def serving_model(model, tokenizer, **state_fields):
    """`serving` an engine over `model` of 4 sequences and 16 tokens a step."""
    engine = make_engine(model, tokenizer, max_num_seqs=4, max_num_batched_tokens=16)
    with serving(engine, **state_fields) as running:
        yield running


@contextlib.contextmanager
def serving(engine, **state_fields):
    """(a test client of the app over `engine`, its ServerState); the engine stops after.
    state_fields: ServerState's, over no API key and a 4,096-byte body limit."""
    fields = {"model_names": [MODEL], "api_key": None, "max_body_bytes": 4096, **state_fields}
    state = ServerState(**fields)
    state.metrics = Metrics(engine, MODEL)
    state.engine = AsyncEngine(engine).start()
    try:
        with TestClient(build_app(state)) as client:
            yield client, state
    finally:
        state.engine.shutdown()


def complete(client, **fields):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 5, "temperature": 0, **fields}
    return client.post("/v1/completions", json=body)


def events(response) -> list:
    lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_models_health_version(server):
    client, _ = server
    assert client.get("/health").status_code == 200
    assert client.get("/version").json()["version"]
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == MODEL


def test_completion_matches_the_model_and_reports_usage(server, model, tokenizer):
    client, _ = server
    response = complete(client, prompt="hello", ignore_eos=True)
    assert response.status_code == 200
    body = response.json()
    ids = tokenizer("hello", add_special_tokens=False).input_ids
    expected = tokenizer.decode(greedy_alone(model, ids, 5))
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == expected
    assert body["choices"][0]["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(ids) and usage["completion_tokens"] == 5
    assert usage["total_tokens"] == len(ids) + 5
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


def test_streamed_completion_equals_the_full_one(server):
    client, _ = server
    full = complete(client, prompt="hello", ignore_eos=True).json()["choices"][0]["text"]
    with client.stream(
        "POST", "/v1/completions",
        json={"model": MODEL, "prompt": "hello", "max_tokens": 5, "temperature": 0,
              "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}},
    ) as response:  # fmt: skip
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = events(response)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == full
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


def test_several_prompts_and_n_choices(server):
    client, _ = server
    body = complete(client, prompt=["ab", "cd"], n=2, temperature=1.0, seed=3, ignore_eos=True)
    body = body.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == 4 * 5
    assert body["usage"]["prompt_tokens"] == 4


def test_echo_with_logprobs_scores_the_prompt(server, model, tokenizer):
    """Perplexity through the API: echo + max_tokens 0 + logprobs."""
    client, _ = server
    response = complete(client, prompt="hello world", max_tokens=0, echo=True, logprobs=1)
    choice = response.json()["choices"][0]
    assert choice["text"] == "hello world"
    ids = tokenizer("hello world", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model.forward_states(torch.tensor([ids]))[0][0].double()
    expected = torch.log_softmax(logits, -1)
    logprobs = choice["logprobs"]["token_logprobs"]
    assert logprobs[0] is None and len(logprobs) == len(ids)
    for i in range(1, len(ids)):
        assert logprobs[i] == pytest.approx(float(expected[i - 1, ids[i]]), abs=1e-4)
    assert choice["logprobs"]["tokens"] == list("hello world")


def test_chat_completion_and_its_stream(server):
    client, _ = server
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    request = {"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0,
               "ignore_eos": True, "logprobs": True, "top_logprobs": 2}  # fmt: skip
    body = client.post("/v1/chat/completions", json=request).json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and len(message["content"]) == 4
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and len(content[0]["top_logprobs"]) == 2
    request.update(stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=request) as response:
        chunks = events(response)
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert streamed == message["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_max_completion_tokens_wins_over_max_tokens(server):
    client, _ = server
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
               "max_tokens": 9, "max_completion_tokens": 2, "ignore_eos": True}  # fmt: skip
    body = client.post("/v1/chat/completions", json=request).json()
    assert body["usage"]["completion_tokens"] == 2


def test_a_session_takes_one_prompt(server):
    client, _ = server
    response = complete(client, prompt=["ab", "cd"], session_id="s2")
    assert response.status_code == 400 and response.json()["error"]["param"] == "session_id"


def test_session_continuation_reports_cached_tokens(server):
    client, _ = server
    first = complete(client, prompt="abcdef", session_id="s1", ignore_eos=True).json()
    second = complete(client, prompt="gh", session_id="s1", ignore_eos=True).json()
    # the saved state holds the 6 prompt tokens and 4 of the 5 generated ones
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 6 + 4
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"logprobs": 50}, "logprobs"),
        ({"prompt": []}, "prompt"),
    ],
)
def test_invalid_fields_are_400_with_an_openai_error(server, fields, param):
    client, _ = server
    response = complete(client, **fields)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"]


def test_chat_input_errors(server):
    client, _ = server
    empty = client.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert empty.status_code == 400 and "messages" in empty.json()["error"]["message"]
    bad_role = {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}
    assert client.post("/v1/chat/completions", json=bad_role).status_code == 400
    malformed = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400 and "JSON" in malformed.json()["error"]["message"]


def test_unknown_model_is_404_and_large_body_is_413(server):
    client, _ = server
    missing = complete(client, model="gpt-17")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    message = missing.json()["error"]["message"]
    assert "gpt-17" in message and f"serves `{MODEL}`" in message
    huge = complete(client, prompt="a" * 5000)
    assert huge.status_code == 413


def test_full_queue_is_503_with_retry_after(server):
    client, state = server
    state.engine.engine.scheduler.max_waiting = 0  # the queue is full
    response = complete(client)
    assert response.status_code == 503 and "Retry-After" in response.headers
    assert response.json()["error"]["type"] == "service_unavailable"


def test_api_key_is_required_when_configured(model, tokenizer):
    engine = make_engine(model, tokenizer)
    state = ServerState(model_names=[MODEL], api_key="sekret")
    state.engine = AsyncEngine(engine).start()
    try:
        with TestClient(build_app(state)) as client:
            assert complete(client).status_code == 401
            wrong = {"Authorization": "Bearer nope"}
            response = client.post("/v1/completions", json={"model": MODEL, "prompt": "a"},
                                   headers=wrong)  # fmt: skip
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "authentication_error"
            good = {"Authorization": "Bearer sekret"}
            body = {"model": MODEL, "prompt": "a", "max_tokens": 1}
            ok = client.post("/v1/completions", json=body, headers=good)
            assert ok.status_code == 200
            assert client.get("/health").status_code == 200  # probes need no key
    finally:
        state.engine.shutdown()


def test_every_error_code_is_the_integer_http_status(model, tokenizer):
    engine = make_engine(model, tokenizer)
    state = ServerState(model_names=[MODEL], api_key="k", max_body_bytes=4096)
    key = {"Authorization": "Bearer k"}
    with TestClient(build_app(state)) as client:
        one = {"model": MODEL, "prompt": "a", "max_tokens": 1}
        loading = client.post("/v1/completions", json=one, headers=key)  # no engine yet: 503
        state.engine = AsyncEngine(engine).start()
        answers = [
            loading,
            client.post("/v1/completions", json={"model": MODEL, "prompt": "a"}),  # 401
            client.post(
                "/v1/completions", json={"model": MODEL, "n": 0, "prompt": "a"}, headers=key
            ),  # 400 (validation)
            client.post("/v1/completions", content=b"{", headers=key),  # 400 (malformed)
            client.post("/v1/completions", json={"model": "x", "prompt": "a"}, headers=key),
            client.get("/v1/sessions/nothing", headers=key),  # 404 (no session)
            client.get("/no/such/route"),  # 404 (route)
            client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "a" * 5000}, headers=key
            ),  # 413
        ]
    state.engine.shutdown()
    statuses = [r.status_code for r in answers]
    assert statuses == [503, 401, 400, 400, 404, 404, 404, 413]
    for response in answers:
        code = response.json()["error"]["code"]
        assert type(code) is int and code == response.status_code, response.text


def test_health_is_503_while_loading_and_after_a_crash(model, tokenizer):
    state = ServerState(model_names=[MODEL])
    with TestClient(build_app(state)) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        assert complete(client).status_code == 503
        engine = make_engine(model, tokenizer)
        state.engine = AsyncEngine(engine).start()
        assert client.get("/health").status_code == 200

        def crash(batch):
            raise RuntimeError("device lost")

        engine.runner.run = crash
        response = complete(client)
        assert response.status_code == 503
        assert client.get("/health").status_code == 503
    state.engine.shutdown()


def test_mid_stream_failure_sends_an_error_event_then_done(server):
    client, state = server
    engine = state.engine.engine
    original = engine._postprocess
    calls = {"n": 0}

    def flaky(seq, token_id, sampled, row):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return original(seq, token_id, sampled, row)

    engine._postprocess = flaky
    with client.stream("POST", "/v1/completions",
                       json={"model": MODEL, "prompt": "abc", "max_tokens": 8, "stream": True,
                             "ignore_eos": True}) as response:  # fmt: skip
        chunks = events(response)
    assert "error" in chunks[-1] and "boom" in chunks[-1]["error"]["message"]
    assert engine.pool.num_free == engine.pool.num_slots


def test_metrics_are_valid_exposition_with_the_documented_names(server):
    client, _ = server
    complete(client, ignore_eos=True)
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "lln:num_requests_running", "lln:num_requests_waiting", "lln:time_to_first_token_seconds",
        "lln:inter_token_latency_seconds", "lln:e2e_request_latency_seconds",
        "lln:request_queue_time_seconds", "lln:prompt_tokens", "lln:generation_tokens",
        "lln:request_success", "lln:state_slots_used", "lln:state_slots_allocated",
        "lln:state_bytes_per_sequence", "lln:state_bytes_in_use", "lln:kv_cache_equivalent_bytes",
        "lln:live_context_length_tokens", "lln:prefix_cache_queries", "lln:prefix_cache_hits",
        "process_resident_memory_bytes",
    ):  # fmt: skip
        assert name in families, name
    samples = {s.name: s for f in families.values() for s in f.samples}
    assert samples["lln:generation_tokens_total"].value == 5
    assert samples["lln:state_slots_allocated"].value == 4
    assert samples["lln:state_slots_allocated"].labels == {"model_name": MODEL}


def test_cors_origins_are_honoured():
    state = ServerState(model_names=[MODEL])
    with TestClient(build_app(state, cors_origins=["http://app.example"])) as client:
        preflight = client.options(
            "/v1/completions",
            headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.headers["access-control-allow-origin"] == "http://app.example"
        other = client.get("/version", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
