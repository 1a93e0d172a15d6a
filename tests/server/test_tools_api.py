"""Tool calling through the API on a tiny random model over a byte-level tokenizer (its
choices are random: whatever parses and validates was made so by the grammar): the generic
format (a template without tools), a Hermes-style template that renders `tools`, every
tool_choice, parallel calls, response_format with tools, streams read by the OpenAI SDK's
accumulator, history, and bad input (always a 400 with an OpenAI error body)."""

import json

import jsonschema
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import PreTrainedTokenizerFast

from server.api import ServerState, build_app
from server.async_engine import AsyncEngine
from server.tools import template_support
from tests.models.conftest import tiny_model
from tests.server.conftest import byte_level_tokenizer
from tests.server.test_api import events
from tests.server.test_engine import make_engine

MODEL = "tiny"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Qwen2.5's template, shortened: tools in the system turn, calls as <tool_call> JSON
HERMES = """{%- if tools %}<|im_start|>system
# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>
Return each call as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                   "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"],
    "additionalProperties": False,
}  # fmt: skip
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"{name} tool",
                                      "parameters": schema}}
    for name, schema in SCHEMAS.items()
]  # fmt: skip
USER = [{"role": "user", "content": "hi"}]


def byte_tokenizer(template: str) -> PreTrainedTokenizerFast:
    return byte_level_tokenizer(template)


def serve(template: str):
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=257, local_size=4,
                       num_sinks=1, sparse_cache_size=3, sparse_span=1)  # fmt: skip
    engine = make_engine(model, byte_tokenizer(template), max_num_seqs=8,
                         max_num_batched_tokens=64, max_waiting=128)  # fmt: skip
    state = ServerState(model_names=[MODEL])
    state.engine = AsyncEngine(engine).start()
    with TestClient(build_app(state)) as client:
        yield client
    state.engine.shutdown()


@pytest.fixture(scope="module")
def client():
    yield from serve(CHATML)


@pytest.fixture(scope="module")
def hermes():
    yield from serve(HERMES)


def chat(client, **fields):
    body = {"model": MODEL, "messages": USER, "tools": TOOLS, "max_tokens": 120, "seed": 1,
            **fields}  # fmt: skip
    return client.post("/v1/chat/completions", json=body)


def valid_calls(message: dict, names=tuple(SCHEMAS)) -> list[dict]:
    """The message's calls, each checked: an id, a known name, arguments (a JSON string) that
    follow that tool's schema."""
    assert message["content"] is None and message["tool_calls"]
    for call in message["tool_calls"]:
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"]["name"] in names
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, SCHEMAS[call["function"]["name"]])
    return message["tool_calls"]


@pytest.mark.parametrize("fixture", ["client", "hermes"])
def test_required_and_named_choices_always_call_valid_tools(request, fixture):
    client = request.getfixturevalue(fixture)
    reply = chat(client, tool_choice="required", n=4, temperature=1.0)
    assert reply.status_code == 200, reply.text
    for choice in reply.json()["choices"]:
        assert len(valid_calls(choice["message"])) == 1
        assert choice["finish_reason"] == "tool_calls"
    named = {"type": "function", "function": {"name": "add"}}
    reply = chat(client, tool_choice=named, n=3).json()
    for choice in reply["choices"]:
        assert [c["function"]["name"] for c in valid_calls(choice["message"])] == ["add"]


@pytest.mark.parametrize("fixture", ["client", "hermes"])
def test_parallel_calls(request, fixture):
    client = request.getfixturevalue(fixture)
    reply = chat(client, tool_choice="required", parallel_tool_calls=True, n=4, max_tokens=400)
    choices = reply.json()["choices"]
    counts = [len(valid_calls(c["message"])) for c in choices if c["finish_reason"] != "length"]
    assert counts and all(n >= 1 for n in counts)
    for choice in choices:
        ids = [c["id"] for c in choice["message"]["tool_calls"] or []]
        assert len(ids) == len(set(ids))


def test_auto_gives_calls_or_an_answer_and_response_format_shapes_the_answer(client):
    replies = chat(client, n=8, temperature=1.0, max_tokens=60).json()["choices"]
    for choice in replies:
        message = choice["message"]
        if message["tool_calls"]:
            valid_calls(message)
        else:
            assert isinstance(message["content"], str) and choice["finish_reason"] != "tool_calls"
    person = {"type": "object", "properties": {"age": {"type": "integer", "maximum": 9}},
              "required": ["age"], "additionalProperties": False}  # fmt: skip
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": person}}
    replies = chat(client, n=8, temperature=1.0, response_format=fmt).json()["choices"]
    for choice in replies:
        if not choice["message"]["tool_calls"]:
            jsonschema.validate(json.loads(choice["message"]["content"]), person)


@pytest.mark.parametrize("fixture", ["client", "hermes"])
def test_tokenize_counts_the_prompt_chat_completions_feeds(fixture, request):
    client = request.getfixturevalue(fixture)
    asked = {"messages": USER, "tools": TOOLS, "tool_choice": "required"}
    body = client.post("/tokenize", json={**asked, "return_token_strs": True}).json()
    plain = client.post("/tokenize", json={"messages": USER}).json()
    assert body["count"] > plain["count"]
    assert "get_weather" in "".join(body["token_strs"]).replace("\u0120", " ")
    usage = chat(client, tool_choice="required", max_tokens=1).json()["usage"]
    assert usage["prompt_tokens"] == body["count"]
    none = client.post("/tokenize", json={**asked, "tool_choice": "none"}).json()
    assert none["tokens"] == plain["tokens"]  # no call possible: no tools rendered


def test_tool_choice_none_and_no_tools_are_plain_chats(client):
    reply = chat(client, tool_choice="none", max_tokens=5, ignore_eos=True).json()
    assert reply["choices"][0]["message"]["tool_calls"] is None
    assert reply["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("fixture", ["client", "hermes"])
def test_a_stream_is_what_the_sdk_accumulator_and_a_chunk_merge_expect(request, fixture):
    client = request.getfixturevalue(fixture)
    raw = chat(client, stream=True, tool_choice="required", parallel_tool_calls=True,
               max_tokens=400, seed=4)  # fmt: skip
    chunks = events(raw)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    calls: dict[int, dict] = {}
    for chunk in chunks:
        delta = chunk["choices"][0]["delta"]
        assert not delta.get("content")  # nothing of the wrapper leaks into the content
        for piece in delta.get("tool_calls", []):
            first = piece["index"] not in calls
            assert ("id" in piece) == first and ("type" in piece) == first
            assert ("name" in piece["function"]) == first
            call = calls.setdefault(piece["index"], {"name": piece["function"].get("name"),
                                                     "arguments": ""})  # fmt: skip
            call["arguments"] += piece["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
    sdk = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client)
    with sdk.chat.completions.stream(
        model=MODEL, messages=USER, tools=TOOLS, tool_choice="required", max_tokens=120, seed=2
    ) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls" and message.content is None
    jsonschema.validate(json.loads(message.tool_calls[0].function.arguments),
                        SCHEMAS[message.tool_calls[0].function.name])  # fmt: skip


def test_a_stream_reassembles_to_the_same_calls_as_the_full_reply(client):
    fields = dict(tool_choice="required", parallel_tool_calls=True, max_tokens=300, seed=7,
                  temperature=0.9)  # fmt: skip
    full = chat(client, **fields).json()["choices"][0]["message"]["tool_calls"]
    calls: dict[int, list] = {}
    for chunk in events(chat(client, stream=True, **fields)):
        for piece in chunk["choices"][0]["delta"].get("tool_calls", []):
            entry = calls.setdefault(piece["index"], [piece["function"].get("name"), ""])
            entry[1] += piece["function"]["arguments"]
    assert [calls[i] for i in sorted(calls)] == [
        [c["function"]["name"], c["function"]["arguments"]] for c in full
    ]


@pytest.mark.parametrize("fixture", ["client", "hermes"])
def test_history_with_calls_and_results(request, fixture):
    client = request.getfixturevalue(fixture)
    first = chat(client, tool_choice="required").json()["choices"][0]["message"]
    call = first["tool_calls"][0]
    history = [*USER, first, {"role": "tool", "tool_call_id": call["id"], "content": "21 C"}]
    reply = chat(client, messages=history, max_tokens=20)
    assert reply.status_code == 200, reply.text
    tokenize = client.post("/tokenize", json={"model": MODEL, "messages": USER})
    assert tokenize.status_code == 200


def hostile_bodies() -> dict[str, tuple[dict, str]]:
    def tool(name="f", parameters=None):
        function = {"name": name, **({"parameters": parameters} if parameters else {})}
        return {"type": "function", "function": function}

    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assistant = {"role": "assistant", "content": None, "tool_calls": [call]}
    return {
        "parameters not an object schema": (
            {"tools": [tool(parameters={"type": "string"})]}, "tools.0.function.parameters"),
        "parameters an array schema": (
            {"tools": [tool(parameters={"type": "array", "items": {}})]},
            "tools.0.function.parameters"),
        "parameters not a schema": ({"tools": [tool(parameters={"type": "object",
                                    "properties": {"a": {"type": "wibble"}}})]}, "tools"),
        "1,000 tools": ({"tools": [tool(f"f{i}") for i in range(1000)]}, "tools"),
        "odd characters in a name": ({"tools": [tool("get weather; rm -rf /")]},
                                     "tools.0.function.name"),
        "an empty name": ({"tools": [tool("")]}, "tools.0.function.name"),
        "a name of 65 characters": ({"tools": [tool("f" * 65)]}, "tools.0.function.name"),
        "two tools of one name": ({"tools": [tool(), tool()]}, "tools.1.function.name"),
        "a tool of another type": (
            {"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools.0.type"),
        "named choice not among the tools": (
            {"tools": [tool()], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice"),
        "a choice without tools": ({"tool_choice": "required"}, "tool_choice"),
        "an unknown choice": ({"tools": [tool()], "tool_choice": "always"}, "tool_choice"),
        "arguments as an object in the history": ({"messages": [*USER, {**assistant,
            "tool_calls": [{**call, "function": {"name": "f", "arguments": {}}}]}]},
            "messages.1.tool_calls.0.function.arguments"),
        "a tool message without a call": (
            {"messages": [*USER, {"role": "tool", "tool_call_id": "call_1", "content": "x"}]},
            "messages.1.tool_call_id"),
        "a tool message of another call": ({"messages": [*USER, assistant, {
            "role": "tool", "tool_call_id": "call_2", "content": "x"}]}, "messages.2.tool_call_id"),
        "a tool message without an id": (
            {"messages": [*USER, assistant, {"role": "tool", "content": "x"}]},
            "messages.2.tool_call_id"),
        "guided_json with tools": ({"tools": [tool()], "guided_json": {}}, "guided_json"),
        "parallel_tool_calls not a boolean": ({"tools": [tool()], "parallel_tool_calls": "yes"},
                                              "parallel_tool_calls"),
        "legacy functions": ({"functions": [{"name": "f"}]}, "functions"),
    }  # fmt: skip


@pytest.mark.parametrize(("body", "param"), hostile_bodies().values(), ids=hostile_bodies().keys())
def test_bad_tools_are_a_400_with_an_openai_error(client, body, param):
    response = client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": USER, "max_tokens": 2, **body})  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 400
    assert error["message"] and error["param"] == param
    assert chat(client, tools=[], max_tokens=2).status_code == 200  # and the server serves on


def test_a_template_that_renders_tools_gets_them_in_its_own_format():
    assert template_support(byte_tokenizer(HERMES)).native == "hermes"
    chatml = template_support(byte_tokenizer(CHATML))
    assert chatml.native is None and chatml.system and chatml.tool_role


def test_requests_and_replies_with_tools_conform_to_the_openapi_document(client):
    document = client.get("/openapi.json").json()

    def schema(name: str) -> dict:
        return {"$ref": f"#/components/schemas/{name}", "components": document["components"]}

    body = {"model": MODEL, "messages": USER, "tools": TOOLS, "tool_choice": "required",
            "max_tokens": 120, "parallel_tool_calls": False, "seed": 1}  # fmt: skip
    jsonschema.validate(body, schema("ChatCompletionRequest"))
    reply = client.post("/v1/chat/completions", json=body).json()
    jsonschema.validate(reply, schema("ChatCompletionResponse"))
    history = {**body, "messages": [*USER, reply["choices"][0]["message"], {
        "role": "tool", "tool_call_id": reply["choices"][0]["message"]["tool_calls"][0]["id"],
        "content": "done"}]}  # fmt: skip
    jsonschema.validate(history, schema("ChatCompletionRequest"))
