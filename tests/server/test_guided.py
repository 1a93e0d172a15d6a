"""Structured outputs through the engine and the API: JSON schema, JSON object, regex, choice
and Lark grammars as token masks (llguidance), with sampling, n > 1, streaming and sessions.

A tiny random model over a byte-level tokenizer (every byte a token, as GPT-2's alphabet, no
merges): its choices are random, so whatever parses was made so by the mask."""

import json
import re

import jsonschema
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import PreTrainedTokenizerFast

import server.guided
from server.api import ServerState, build_app
from server.async_engine import AsyncEngine
from server.request import GuidedSpec, SamplingParams
from tests.models.conftest import tiny_model
from tests.server.conftest import byte_level_tokenizer
from tests.server.test_engine import make_engine

MODEL = "tiny"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def byte_tokenizer() -> PreTrainedTokenizerFast:
    return byte_level_tokenizer("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")


@pytest.fixture(scope="module")
def engine(byte_tokenizer):
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=257, local_size=4,
                       num_sinks=1, sparse_cache_size=3, sparse_span=1)  # fmt: skip
    return make_engine(model, byte_tokenizer, max_num_seqs=8, max_num_batched_tokens=64,
                       max_waiting=128)  # fmt: skip


@pytest.fixture
def client(engine):
    state = ServerState(model_names=[MODEL])
    state.engine = AsyncEngine(engine).start()
    with TestClient(build_app(state)) as test_client:
        yield test_client
    state.engine.shutdown()


def run(engine, prompts: dict[str, SamplingParams]) -> dict[str, str]:
    """Texts of requests run together to the end."""
    for request_id, params in prompts.items():
        engine.add_request(request_id, engine.tokenizer("hi").input_ids, params)
    texts = dict.fromkeys(prompts, "")
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] += out.text
    return texts


def test_100_seeded_samples_all_validate_against_the_schema(engine):
    spec = GuidedSpec.json_schema(SCHEMA)
    params = {
        f"r{seed}": SamplingParams(temperature=1.0, seed=seed, max_tokens=200, guided=spec)
        for seed in range(100)
    }
    texts = run(engine, params)
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts.values())) > 50  # sampled, not one forced answer
    again = run(engine, {"r7": params["r7"]})  # seeded: the same alone as in a batch
    assert again["r7"] == texts["r7"]


def test_json_object_regex_choice_and_grammar(engine):
    pattern = r"[0-9]{3}-[a-z]{2}"
    texts = run(engine, {
        "object": SamplingParams(max_tokens=200, seed=1, guided=GuidedSpec.json_schema(None)),
        "regex": SamplingParams(max_tokens=40, seed=2, guided=GuidedSpec("regex", pattern)),
        "choice": SamplingParams(max_tokens=40, seed=3, guided=GuidedSpec.choice(["yes", "no!"])),
        "grammar": SamplingParams(max_tokens=40, seed=4, guided=GuidedSpec(
            "grammar", 'start: "(" NUM ("+" NUM)* ")"\nNUM: /[1-9][0-9]?/')),
    })  # fmt: skip
    assert isinstance(json.loads(texts["object"]), dict)
    assert re.fullmatch(pattern, texts["regex"])
    assert texts["choice"] in ("yes", "no!")
    assert re.fullmatch(r"\((?:[1-9][0-9]?)(?:\+[1-9][0-9]?)*\)", texts["grammar"])


def test_unconstrained_rows_are_left_alone(engine):
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = run(engine, {"plain": plain})["plain"]
    mixed = run(engine, {"plain": plain, "json": SamplingParams(
        max_tokens=100, seed=5, guided=GuidedSpec.json_schema(SCHEMA))})  # fmt: skip
    assert mixed["plain"] == alone


def chat(client, **fields):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Give me JSON"}],
            "max_tokens": 200, "seed": 0, **fields}  # fmt: skip
    return client.post("/v1/chat/completions", json=body)


def test_api_response_format_json_schema_with_n_and_streaming(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    response = chat(client, response_format=fmt, n=3)
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
        assert choice["finish_reason"] == "stop"
    streamed = chat(client, response_format={"type": "json_object"}, stream=True)
    lines = [line[6:] for line in streamed.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    text = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in map(json.loads, lines[:-1])
    )
    assert isinstance(json.loads(text), dict)


def test_api_vllm_guided_fields_on_completions_and_sessions(client):
    body = {"model": MODEL, "prompt": "pick", "max_tokens": 20, "seed": 3}
    choice = client.post("/v1/completions", json={**body, "guided_choice": ["red", "blue"]})
    assert choice.json()["choices"][0]["text"] in ("red", "blue")
    regex = client.post("/v1/completions", json={**body, "guided_regex": "[A-Z][a-z]{2,4}"})
    assert re.fullmatch("[A-Z][a-z]{2,4}", regex.json()["choices"][0]["text"])
    for turn in range(2):  # a session carries the state, the grammar is per request
        turn_body = {**body, "prompt": f"turn {turn}", "session_id": "g1", "guided_json": SCHEMA,
                     "max_tokens": 200}  # fmt: skip
        reply = client.post("/v1/completions", json=turn_body)
        assert reply.status_code == 200, reply.text
        jsonschema.validate(json.loads(reply.json()["choices"][0]["text"]), SCHEMA)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format"),
        ({"guided_json": {"type": "wibble"}}, "guided_json"),
        ({"guided_regex": "[0-9"}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "guided_regex": "a"},
         "guided_regex"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"logit_bias": {"9999": 5}}, None),
        ({"logit_bias": {"3": 500}}, None),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_a_400(client, fields, param):
    response = chat(client, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param
    assert chat(client, max_tokens=2).status_code == 200  # and the server keeps serving


def test_fields_that_ask_for_nothing_pass_and_logit_bias_works(client, byte_tokenizer):
    assert chat(client, tools=[], tool_choice="none", max_tokens=2).status_code == 200
    token = byte_tokenizer("Q").input_ids[0]
    forced = chat(client, temperature=0, max_tokens=3, ignore_eos=True,
                  logit_bias={str(token): 100})  # fmt: skip
    assert forced.json()["choices"][0]["message"]["content"] == "QQQ"


def test_a_prefix_cache_hit_keeps_the_constraint(engine):
    """The second request reuses the first one's prefilled prefix (the state); the mask is the
    request's own, so the output still validates."""
    prompt = engine.tokenizer("a shared system prompt, long enough to be cached").input_ids
    spec = GuidedSpec.json_schema(SCHEMA)
    cached = []
    for request_id in ("first", "second"):
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=200, seed=9, guided=spec))
        text = ""
        while engine.has_unfinished():
            for out in engine.step():
                text += out.text
                cached.append(out.num_cached_tokens)
        jsonschema.validate(json.loads(text), SCHEMA)
    assert cached[0] == 0 and cached[-1] > 0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_no_empty_chunk_while_a_character_is_incomplete(client, path):
    """Each emoji is 4 byte tokens: the detokenizer holds back the first 3, and those steps
    send nothing (their logprobs come with the chunk that completes the character)."""
    body = {"model": MODEL, "max_tokens": 20, "stream": True, "logprobs": 1,
            "guided_choice": ["😀🎉"], "stream_options": {"include_usage": True}}  # fmt: skip
    if path == "/v1/completions":
        body["prompt"] = "emoji"
    else:
        body["messages"] = [{"role": "user", "content": "emoji"}]
        body["top_logprobs"], body["logprobs"] = 1, True
    lines = [line[6:] for line in client.post(path, json=body).iter_lines() if line[:6] == "data: "]
    chunks = [json.loads(line) for line in lines[:-1]]
    *tokens, usage = chunks
    texts = [c["choices"][0]["delta"].get("content") if "delta" in c["choices"][0]
             else c["choices"][0]["text"] for c in tokens]  # fmt: skip
    assert "".join(texts) == "😀🎉"
    for i, (chunk, text) in enumerate(zip(tokens, texts, strict=True)):
        first, last = i == 0, chunk["choices"][0].get("finish_reason") is not None
        assert text or first or last, chunks
    if path == "/v1/completions":
        scored = sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in tokens)
    else:
        scored = sum(
            len((c["choices"][0].get("logprobs") or {}).get("content", [])) for c in tokens
        )
    assert scored == usage["usage"]["completion_tokens"] >= 8


def test_a_repeated_schema_is_compiled_once(client, monkeypatch):
    compiled = []

    def counting(spec):
        compiled.append(spec)
        return grammar(spec)

    grammar = server.guided._grammar
    monkeypatch.setattr(server.guided, "_grammar", counting)
    schema = {**SCHEMA, "title": "compiled once"}  # not cached by the other tests
    for _ in range(2):
        assert chat(client, guided_json=schema, max_tokens=5).status_code == 200
    assert len(compiled) == 1
    assert chat(client, guided_json={**schema, "title": "another"}, max_tokens=5).status_code == 200
    assert len(compiled) == 2
