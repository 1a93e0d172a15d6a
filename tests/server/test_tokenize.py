"""`/tokenize` and `/detokenize` (vLLM's shapes) on a tiny model with a character tokenizer
that appends `</s>` when asked for special tokens."""

import pytest
import torch
from fastapi.testclient import TestClient
from tokenizers.processors import TemplateProcessing

from server.api import ServerState, build_app
from server.async_engine import AsyncEngine
from tests.conftest import make_char_tokenizer
from tests.models.conftest import tiny_model
from tests.server.test_api import MODEL
from tests.server.test_engine import VOCAB, make_engine

EOS = 1
USER = [{"role": "user", "content": "hi"}]
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = make_char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", EOS)]
    )
    return tokenizer


@pytest.fixture(scope="module")
def client(tokenizer):
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=VOCAB, local_size=4,
                       num_sinks=1)  # fmt: skip
    engine = make_engine(model, tokenizer, max_model_len=512, default_max_tokens=16)
    state = ServerState(model_names=[MODEL], api_key="k")
    state.engine = AsyncEngine(engine).start()
    with TestClient(build_app(state), headers={"Authorization": "Bearer k"}) as test_client:
        yield test_client
    state.engine.shutdown()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_tokenize_a_prompt(client, tokenizer):
    body = client.post("/tokenize", json={"model": MODEL, "prompt": "ab c"}).json()
    tokens = [*ids(tokenizer, "ab c"), EOS]
    assert body == {"count": 5, "max_model_len": 512, "tokens": tokens, "token_strs": None}
    plain = client.post("/tokenize", json={"prompt": "ab", "add_special_tokens": False}).json()
    assert plain["tokens"] == ids(tokenizer, "ab") and plain["count"] == 2
    strs = client.post("/tokenize", json={"prompt": "ab", "return_token_strs": True}).json()
    assert strs["token_strs"] == ["a", "b", "</s>"]


def test_tokenize_a_conversation_as_chat_completions_renders_it(client, tokenizer):
    body = client.post("/tokenize", json={"model": MODEL, "messages": USER}).json()
    assert body["tokens"] == ids(tokenizer, "user hi assistant ")  # no </s> by default
    assert body["count"] == len(body["tokens"])
    bare = {"messages": USER, "add_generation_prompt": False, "add_special_tokens": True}
    assert client.post("/tokenize", json=bare).json()["tokens"] == [
        *ids(tokenizer, "user hi "),
        EOS,
    ]


CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": CITY}}
NAMED_X = {"type": "function", "function": {"name": "x"}}
TOOL_REPLY = {"role": "tool", "content": "1", "tool_call_id": "c"}


def test_detokenize_inverts_tokenize(client):
    tokens = client.post("/tokenize", json={"prompt": "hello world"}).json()["tokens"]
    body = client.post("/detokenize", json={"model": MODEL, "tokens": tokens}).json()
    assert body == {"prompt": "hello world</s>"}


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/tokenize", {"prompt": ""}, 400, "prompt"),
        ("/tokenize", {"messages": []}, 400, "messages"),
        ("/tokenize", {"prompt": "a", "model": "gpt-17"}, 404, "model"),
        ("/tokenize", {"prompt": "a", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
        ("/tokenize", {"prompt": "a", "messages": USER}, 400, "prompt"),
        ("/tokenize", {"messages": USER, "tools": [{}]}, 400, "tools.0.type"),
        (
            "/tokenize",
            {"messages": USER, "tools": [WEATHER], "tool_choice": NAMED_X},
            400,
            "tool_choice",
        ),
        ("/tokenize", {"messages": [TOOL_REPLY]}, 400, "messages.0.tool_call_id"),
        ("/detokenize", {"tokens": []}, 400, "tokens"),
        ("/detokenize", {"tokens": [3, VOCAB]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": [2**70]}, 400, "tokens"),
        ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0"),
        ("/detokenize", {"tokens": [1], "model": "gpt-17"}, 404, "model"),
    ],
)
def test_bad_input_is_an_openai_error(client, path, body, status, param):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == status and error["message"]


def test_a_template_that_refuses_the_conversation_is_a_400(client, tokenizer):
    refusing = "{{ raise_exception('roles must alternate') }}"
    tokenizer.chat_template, saved = refusing, tokenizer.chat_template
    try:
        response = client.post("/tokenize", json={"messages": USER})
    finally:
        tokenizer.chat_template = saved
    assert response.status_code == 400 and "roles must alternate" in response.text
    assert response.json()["error"]["param"] == "messages"


def test_the_api_key_is_required(client):
    for path, body in [("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [3]})]:
        response = client.post(path, json=body, headers={"Authorization": "Bearer nope"})
        assert response.status_code == 401 and response.json()["error"]["code"] == 401
