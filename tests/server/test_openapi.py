"""The OpenAPI document describes the request and response bodies of the OpenAI routes (so
/docs shows them and client generators and schema fuzzers can use them), and real responses
conform to it."""

import jsonschema
import pytest
from fastapi.testclient import TestClient

from server.api import ServerState, build_app
from tests.server.test_api import MODEL, model, server, tokenizer  # noqa: F401 (fixtures)


def resolved(document: dict, name: str) -> dict:
    """A component schema with its references resolvable by jsonschema."""
    return {"$ref": f"#/components/schemas/{name}", "components": document["components"]}


@pytest.fixture
def document(server):  # noqa: F811
    client, _ = server
    response = client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def test_routes_document_their_bodies(document):
    for path, request, response in [
        ("/v1/completions", "CompletionRequest", "CompletionResponse"),
        ("/v1/chat/completions", "ChatCompletionRequest", "ChatCompletionResponse"),
    ]:
        post = document["paths"][path]["post"]
        body = post["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].endswith(request)
        ok = post["responses"]["200"]["content"]
        assert ok["application/json"]["schema"]["$ref"].endswith(response)
        assert "text/event-stream" in ok
        assert post["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "ErrorResponse"
        )
    fields = document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for name in ("messages", "max_tokens", "response_format", "guided_json", "session_id",
                 "tools", "tool_choice", "parallel_tool_calls"):  # fmt: skip
        assert name in fields
    schemas = document["components"]["schemas"]
    assert {"tool_calls", "tool_call_id"} <= set(schemas["ChatMessage"]["properties"])
    assert "tool_calls" in schemas["AssistantMessage"]["properties"]
    assert "prompt" in document["components"]["schemas"]["CompletionRequest"]["required"]


def test_real_requests_and_responses_conform(server, document):  # noqa: F811
    client, _ = server
    requests = [
        ("/v1/completions", {"model": MODEL, "prompt": "abc", "max_tokens": 3, "logprobs": 2},
         "CompletionRequest", "CompletionResponse"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
         "max_tokens": 3, "logprobs": True, "top_logprobs": 1},
         "ChatCompletionRequest", "ChatCompletionResponse"),
    ]  # fmt: skip
    for path, body, request_schema, response_schema in requests:
        jsonschema.validate(body, resolved(document, request_schema))
        response = client.post(path, json=body)
        assert response.status_code == 200
        jsonschema.validate(response.json(), resolved(document, response_schema))
    error = client.post("/v1/completions", json={"model": MODEL, "prompt": "a", "n": 0})
    assert error.status_code == 400
    jsonschema.validate(error.json(), resolved(document, "ErrorResponse"))


def test_the_document_needs_no_engine():
    app = build_app(ServerState(model_names=["m"]))
    assert "/v1/completions" in TestClient(app).get("/openapi.json").json()["paths"]


def test_tokenize_routes_are_documented_and_conform(server, document):  # noqa: F811
    client, _ = server
    tokenize = document["paths"]["/tokenize"]["post"]
    body = tokenize["requestBody"]["content"]["application/json"]["schema"]
    assert [ref["$ref"].rsplit("/", 1)[1] for ref in body["oneOf"]] == [
        "TokenizeCompletionRequest", "TokenizeChatRequest",
    ]  # fmt: skip
    for request in [{"model": MODEL, "prompt": "abc", "return_token_strs": True},
                    {"messages": [{"role": "user", "content": "hi"}]}]:  # fmt: skip
        jsonschema.validate(request, {**body, "components": document["components"]})
        response = client.post("/tokenize", json=request)
        assert response.status_code == 200
        jsonschema.validate(response.json(), resolved(document, "TokenizeResponse"))
    tokens = client.post("/tokenize", json={"prompt": "abc"}).json()["tokens"]
    response = client.post("/detokenize", json={"model": MODEL, "tokens": tokens})
    assert response.status_code == 200 and response.json()["prompt"] == "abc"
    jsonschema.validate(response.json(), resolved(document, "DetokenizeResponse"))
    assert "400" in document["paths"]["/detokenize"]["post"]["responses"]
