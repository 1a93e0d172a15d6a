"""Bounded work: a server default for max_tokens, --max-model-len, and 400 (not 503) for a
request that could never be admitted. Tiny random model through the HTTP API."""

import pytest
from fastapi.testclient import TestClient

from server.api import ServerState, build_app
from server.async_engine import AsyncEngine
from server.config import EngineConfig
from tests.server.test_api import MODEL, complete, model, tokenizer  # noqa: F401 (fixtures)
from tests.server.test_engine import make_engine


@pytest.fixture
def limited(model, tokenizer):  # noqa: F811
    engine = make_engine(model, tokenizer, max_num_seqs=2, max_waiting=6, max_model_len=40,
                         default_max_tokens=7, max_num_batched_tokens=16)  # fmt: skip
    state = ServerState(model_names=[MODEL])
    state.engine = AsyncEngine(engine).start()
    with TestClient(build_app(state)) as client:
        yield client
    state.engine.shutdown()


def chat(client, **fields):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
            "ignore_eos": True, **fields}  # fmt: skip
    return client.post("/v1/chat/completions", json=body)


def test_a_request_without_max_tokens_gets_the_server_default(limited):
    response = chat(limited)
    assert response.status_code == 200
    body = response.json()
    assert body["usage"]["completion_tokens"] == 7
    assert body["choices"][0]["finish_reason"] == "length"


def test_the_default_stops_at_max_model_len(limited):
    prompt = "x" * 36  # the char tokenizer: one token per character
    response = complete(limited, prompt=prompt, max_tokens=None, ignore_eos=True)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 40 - 36


def test_prompt_plus_max_tokens_over_the_limit_is_400_naming_both(limited):
    response = complete(limited, prompt="x" * 30, max_tokens=20)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "30" in message and "20" in message and "40" in message
    too_long = complete(limited, prompt="x" * 40, max_tokens=1)
    assert too_long.status_code == 400 and "40" in too_long.json()["error"]["message"]
    streamed = complete(limited, prompt="x" * 30, max_tokens=20, stream=True)
    assert streamed.status_code == 400


def test_requests_that_can_never_run_are_400_not_503(limited):
    too_many = chat(limited, n=3, max_tokens=2)
    assert too_many.status_code == 400
    assert (
        too_many.json()["error"]["param"] == "n" and "slots" in too_many.json()["error"]["message"]
    )
    many_prompts = complete(limited, prompt=["a", "b", "c", "d"], n=2, max_tokens=1)
    assert many_prompts.status_code == 400 and "queues" in many_prompts.json()["error"]["message"]
    assert "Retry-After" not in many_prompts.headers
    assert chat(limited, n=2, max_tokens=2).status_code == 200  # the server keeps serving


def test_a_session_counts_its_history_and_survives_a_refused_turn(limited):
    first = complete(limited, prompt="x" * 20, max_tokens=4, session_id="s1")
    assert first.status_code == 200
    refused = complete(limited, prompt="y" * 10, max_tokens=10, session_id="s1")
    # the history (20 + 4 generated) counts: 34 tokens of context, plus 10, over 40
    assert refused.status_code == 400 and "34" in refused.json()["error"]["message"]
    again = complete(limited, prompt="y" * 5, max_tokens=4, session_id="s1")
    assert again.status_code == 200
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_config_checks_the_limits():
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig(max_model_len=0)
    with pytest.raises(ValueError, match="default_max_tokens"):
        EngineConfig(max_model_len=100, default_max_tokens=100)
