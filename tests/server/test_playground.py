"""The playground's HTTP side (no browser): `/` serves the page and its assets, `--no-ui` turns
them off, and `/v1/state_info` reports what the page charts, behind the API key."""

import os
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api import STATIC_DIR, ServerState, build_app
from server.async_engine import AsyncEngine
from server.cli import build_parser
from tests.server.test_api import MODEL, complete, model, tokenizer  # noqa: F401 (fixtures)
from tests.server.test_engine import make_engine

ROOT = Path(__file__).resolve().parents[2]


def make_client(model, tokenizer, **fields) -> tuple[TestClient, ServerState]:  # noqa: F811
    engine = make_engine(model, tokenizer, max_num_seqs=4, max_num_batched_tokens=16)
    state = ServerState(model_names=[MODEL], **fields)
    state.engine = AsyncEngine(engine).start()
    return TestClient(build_app(state)), state


@pytest.fixture
def keyed(model, tokenizer):  # noqa: F811
    client, state = make_client(model, tokenizer, api_key="sesame")
    with client:
        yield client
    state.engine.shutdown()


def test_the_page_and_its_assets_are_served():
    client = TestClient(build_app(ServerState(model_names=["m"])))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset, kind in [("app.js", "javascript"), ("style.css", "text/css"),
                        ("favicon.svg", "image/svg+xml")]:  # fmt: skip
        assert f"/static/{asset}" in page.text
        response = client.get(f"/static/{asset}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
    assert client.get("/favicon.ico").headers["content-type"] == "image/svg+xml"
    missing = client.get("/static/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"
    assert "/" not in client.get("/openapi.json").json()["paths"]


def test_the_page_loads_nothing_from_elsewhere():
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text and "//cdn" not in text


def test_no_ui_serves_no_page():
    client = TestClient(build_app(ServerState(model_names=["m"], ui=False)))
    for path in ("/", "/static/app.js", "/static/style.css", "/favicon.ico"):
        response = client.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == 404
    assert client.get("/health").status_code == 503  # the API is still there (loading)


def test_static_files_ship_in_the_wheel():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["server"]
    for path in STATIC_DIR.iterdir():
        assert any(fnmatch(f"static/{path.name}", g) for g in globs), path.name


def test_the_page_loads_a_long_context_and_shows_prefill_progress():
    """The controls for a long context (file, drop, paste) and the prefill bar, and the script
    that asks for progress chunks and reads them (the browser test runs them)."""
    page = (STATIC_DIR / "index.html").read_text()
    controls = ['id="context-file" type="file"', 'id="context-text"', 'id="context-status"']
    controls += ['id="context-clear"', '<progress id="prefill-bar"', 'id="prefill-text"']
    for control in controls:
        assert control in page, control
    script = (STATIC_DIR / "app.js").read_text()
    pieces = ("return_progress: true", "chunk.prompt_progress", 'addEventListener("drop"',
              "file.text()", "tok/s", "left`")  # fmt: skip
    for piece in pieces:
        assert piece in script, piece
    assert "#prefill-bar" in (STATIC_DIR / "style.css").read_text()


def test_the_page_offers_tools_and_shows_calls():
    """The Tools box (functions as JSON, the choice, parallel calls) and the script that sends
    them, accumulates streamed calls as the OpenAI SDK does, and sends the next message as the
    call's result."""
    page = (STATIC_DIR / "index.html").read_text()
    for control in ('id="tools-box"', 'id="tools"', 'id="tool-choice"', 'id="parallel-calls"'):
        assert control in page, control
    script = (STATIC_DIR / "app.js").read_text()
    pieces = ("tool_choice:", "parallel_tool_calls", "choice.delta.tool_calls", 'role: "tool"',
              "tool_call_id: call.id", "tool_calls: result.calls")  # fmt: skip
    for piece in pieces:
        assert piece in script, piece


def test_no_ui_flag_and_environment_variable():
    assert build_parser().parse_args(["serve"]).no_ui == "0"
    assert build_parser().parse_args(["serve", "--no-ui"]).no_ui == "1"
    os.environ["LLN_SERVE_NO_UI"] = "1"
    try:
        assert build_parser().parse_args(["serve"]).no_ui == "1"
    finally:
        del os.environ["LLN_SERVE_NO_UI"]
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve"], capture_output=True, text=True,
        check=False, timeout=120, env={**os.environ, "LLN_SERVE_NO_UI": "maybe"},
    )  # fmt: skip
    assert result.returncode == 2 and "LLN_SERVE_NO_UI must be 1 or 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_state_info_needs_the_key_and_reports_the_state(keyed):
    assert keyed.get("/v1/state_info").status_code == 401
    auth = {"Authorization": "Bearer sesame"}
    info = keyed.get("/v1/state_info", headers=auth).json()
    assert info["object"] == "state_info" and info["model"] == MODEL
    assert info["state_bytes_per_sequence"] > 0
    # 2 (K and V) x layers x KV heads x head dim x 2 bytes (bf16)
    shape = info["num_layers"] * info["num_key_value_heads"] * info["head_dim"]
    assert info["kv_cache_bytes_per_token"] == 2 * shape * 2
    assert info["state_slots_allocated"] == 4 and info["num_requests_running"] == 0
    assert info["session"] is None


def test_state_info_reports_a_saved_session(keyed):
    auth = {"Authorization": "Bearer sesame"}
    body = {"model": MODEL, "prompt": "abcdef", "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "session_id": "chat-1"}  # fmt: skip
    first = keyed.post("/v1/completions", json=body, headers=auth).json()["usage"]
    one = keyed.get("/v1/state_info?session_id=chat-1", headers=auth).json()
    second = keyed.post("/v1/completions", json={**body, "prompt": "gh"}, headers=auth).json()
    two = keyed.get("/v1/state_info?session_id=chat-1", headers=auth).json()
    assert one["session"]["num_tokens"] == first["prompt_tokens"] + first["completion_tokens"]
    assert two["session"]["num_tokens"] == one["session"]["num_tokens"] + 2 + 5
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] == 10  # 6 + 4 seen
    assert one["session"]["state_bytes"] == two["session"]["state_bytes"]
    per_token = one["kv_cache_bytes_per_token"]
    for info in (one, two):
        session = info["session"]
        assert session["kv_cache_equivalent_bytes"] == session["num_tokens"] * per_token


def test_state_info_errors_are_openai_errors(keyed):
    auth = {"Authorization": "Bearer sesame"}
    missing = keyed.get("/v1/state_info?session_id=nobody", headers=auth)
    assert missing.status_code == 404
    assert missing.json()["error"]["param"] == "session_id"
    too_long = keyed.get(f"/v1/state_info?session_id={'x' * 300}", headers=auth)
    assert too_long.status_code == 400 and "session_id" in too_long.json()["error"]["message"]
    loading = TestClient(build_app(ServerState(model_names=["m"])))
    assert loading.get("/v1/state_info").status_code == 503


OPENING = (
    "{% if messages[0]['role'] != 'system' %}sys {% endif %}{% for m in messages %}"
    "{{ m['role'][0] }} {{ m['content'] }} e {% endfor %}"
    "{% if add_generation_prompt %}a {% endif %}"
)


def test_a_continued_chat_session_does_not_repeat_the_templates_opening(model):  # noqa: F811
    """The playground's session mode sends only the new message: the template's default
    opening (a system prompt here: "sys ") is not rendered again inside the conversation, and
    the earlier answer's turn is closed first (" e ")."""
    from tests.conftest import make_char_tokenizer

    chat_tokenizer = make_char_tokenizer()
    chat_tokenizer.chat_template = OPENING
    client, state = make_client(model, chat_tokenizer)
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "session_id": "c"}  # fmt: skip

    def say(text: str) -> dict:
        messages = [{"role": "user", "content": text}]
        return client.post("/v1/chat/completions", json={**body, "messages": messages}).json()

    with client:
        first, second = say("hi")["usage"], say("there")["usage"]
    state.engine.shutdown()
    assert first["prompt_tokens"] == len("sys u hi e a ")
    # the last answer's final token (not yet in the state), then the continuation
    assert second["prompt_tokens"] == 1 + len(" e u there e a ")
    assert second["prompt_tokens_details"]["cached_tokens"] == len("sys u hi e a ") + 4 - 1


def test_no_ui_reaches_the_server_config(monkeypatch):
    import server.serve
    from server.cli import main

    seen = []
    monkeypatch.setattr(server.serve, "serve", lambda engine, http: seen.append(http) or 0)
    assert main(["serve"]) == 0 and main(["serve", "--no-ui"]) == 0
    assert [config.ui for config in seen] == [True, False]


def test_the_pages_key_picks_the_tenant_and_another_key_starts_over():
    """Every call of the page carries the key typed in its key field, so the key picks the
    tenant (whose sessions the page continues); typing another key drops the conversation,
    whose session belongs to the previous tenant (another tenant's id is a new session)."""
    script = (STATIC_DIR / "app.js").read_text()
    assert "h.Authorization = `Bearer ${key}`" in script
    handler = script[script.index('$("api-key").addEventListener("change"') :]
    handler = handler[: handler.index("});")]
    assert "resetConversation();" in handler and "connect();" in handler
