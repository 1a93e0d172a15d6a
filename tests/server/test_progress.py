"""Prompt progress while a prompt prefills (`return_progress`, as llama.cpp's server): the
engine's progress outputs, the SSE chunks of both endpoints, the OpenAI SDK reading them, and
`lln-serve generate`'s progress bar on stderr."""

import contextlib
import io

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import server.cli as cli
from tests.server.test_api import MODEL, events, model, serving, tokenizer  # noqa: F401 (fixtures)
from tests.server.test_engine import greedy, make_engine
from tests.server.test_playground_browser import tiny_checkpoint

PROMPT = "the quick brown fox jumps"  # 25 tokens: 7 chunks of at most 4 (test_api's server)
PROGRESS_KEYS = {"total", "cache", "processed", "time_ms"}
MIN_TOKENS = cli.PROGRESS_MIN_TOKENS


def steps_of(engine, *requests) -> list[list]:
    """Add the requests (add_request's arguments and keywords), step until idle; the outputs of
    each step."""
    for args, kwargs in requests:
        engine.add_request(*args, **kwargs)
    steps = []
    while engine.has_unfinished():
        steps.append(engine.step())
    return steps


def test_one_progress_output_per_prefill_step_then_the_first_token(model, tokenizer):  # noqa: F811
    engine = make_engine(model, tokenizer)  # chunks of 4
    prompt = list(range(3, 14))  # 11 tokens: 4 + 4 + 3
    steps = steps_of(engine, (("r", prompt, greedy(3)), {"return_progress": True}))
    progress = [[o.progress for o in step if o.progress is not None] for step in steps]
    assert [[p.processed for p in step] for step in progress] == [[4], [8], [11], [], []]
    assert all(p.total == 11 and p.cache == 0 for step in progress for p in step)
    times = [p.time_ms for step in progress for p in step]
    assert times == sorted(times) and times[0] >= 0
    last = steps[2]  # the last chunk's step: its progress, then the first token
    assert last[0].progress is not None and last[0].token_ids == [] and not last[0].finished
    assert last[1].progress is None and len(last[1].token_ids) == 1
    plain = steps_of(make_engine(model, tokenizer), (("r", prompt, greedy(3)), {}))
    assert all(o.progress is None for step in plain for o in step)
    tokens = [t for step in steps for o in step for t in o.token_ids]
    assert tokens == [t for step in plain for o in step for t in o.token_ids]


def test_progress_counts_a_prefix_cache_hit_and_a_sessions_history(model, tokenizer):  # noqa: F811
    engine = make_engine(model, tokenizer)
    shared = list(range(3, 12))  # 9 tokens: the cache keeps the first 8
    steps_of(engine, (("a", shared, greedy(2)), {}))
    steps = steps_of(engine, (("b", [*shared, 20, 21], greedy(2)), {"return_progress": True}))
    hit = [o.progress for step in steps for o in step if o.progress is not None]
    assert [(p.total, p.cache, p.processed) for p in hit] == [(11, 8, 11)]

    steps_of(engine, (("t1", [3, 9, 4, 12, 7], greedy(4), "s"), {}))
    steps = steps_of(engine, (("t2", [8, 8, 20, 5, 6], greedy(2), "s"), {"return_progress": True}))
    turn = [o.progress for step in steps for o in step if o.progress is not None]
    history = 5 + 4 - 1  # the saved state; its last token is prefilled with the new ones
    assert [(p.total, p.cache, p.processed) for p in turn] == [
        (history + 6, history, history + 4),  # the chunk ends on a multiple of 4
        (history + 6, history, history + 6),
    ]


def test_only_the_prefilling_choice_reports_progress(model, tokenizer):  # noqa: F811
    engine = make_engine(model, tokenizer)
    steps = steps_of(engine, (("r", list(range(3, 9)), greedy(2, n=2)), {"return_progress": True}))
    outputs = [o for step in steps for o in step]
    assert [o.index for o in outputs if o.progress is not None] == [0, 0]
    assert sum(len(o.token_ids) for o in outputs if o.index == 1) == 2


# ---- the API -------------------------------------------------------------------------------------


@pytest.fixture
def server(model, tokenizer):  # noqa: F811
    """test_api's server without a prefix cache: the same prompt again is prefilled again."""
    engine = make_engine(model, tokenizer, max_num_seqs=4, max_num_batched_tokens=16,
                         prefix_cache_bytes=0)  # fmt: skip
    with serving(engine) as running:
        yield running


def stream(client, path: str, **fields) -> list[dict]:
    with client.stream("POST", path, json={"model": MODEL, "stream": True, **fields}) as response:
        assert response.status_code == 200, response.read()
        return events(response)


def check_progress_then_tokens(chunks: list[dict], total: int) -> list[dict]:
    """Progress chunks (choices [], llama.cpp's four fields) all come before the first token
    chunk, processed rises to total; the other chunks."""
    progress = [c["prompt_progress"] for c in chunks if "prompt_progress" in c]
    assert progress and all(set(p) == PROGRESS_KEYS for p in progress)
    first_token = next(i for i, c in enumerate(chunks) if c["choices"])
    assert all("prompt_progress" in c for c in chunks[:first_token])
    assert all("prompt_progress" not in c for c in chunks[first_token:])
    assert all(c["choices"] == [] for c in chunks[:first_token])
    processed = [p["processed"] for p in progress]
    assert processed == sorted(set(processed)) and processed[-1] == total
    assert all(p["total"] == total and p["cache"] == 0 for p in progress)
    times = [p["time_ms"] for p in progress]
    assert times == sorted(times)
    assert len(progress) == -(-total // 4)  # one per prefill chunk of 4
    return chunks[first_token:]


def without_ids(chunks: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k not in ("id", "created")} for c in chunks]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streams_carry_progress_only_when_asked(server, endpoint):
    client, _ = server
    if endpoint == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}]}
        total = len(f"<user>{PROMPT}<assistant>")
    else:
        path, body = "/v1/completions", {"prompt": PROMPT}
        total = len(PROMPT)
    body |= {"max_tokens": 4, "temperature": 0, "ignore_eos": True,
             "stream_options": {"include_usage": True}}  # fmt: skip
    plain = stream(client, path, **body)
    unasked = stream(client, path, **body, return_progress=False)
    asked = stream(client, path, **body, return_progress=True)
    assert all("prompt_progress" not in c for c in plain + unasked)
    assert without_ids(unasked) == without_ids(plain)
    assert without_ids(check_progress_then_tokens(asked, total)) == without_ids(plain)


def test_several_prompts_each_report_their_progress(server):
    client, _ = server
    prompts = ["abcdefghij", "klmnopq"]
    chunks = stream(client, "/v1/completions", prompt=prompts, max_tokens=3, temperature=0,
                    ignore_eos=True, n=2, return_progress=True)  # fmt: skip
    for number, prompt in enumerate(prompts):
        mine = [
            i for i, c in enumerate(chunks)
            if c.get("prompt_progress", {}).get("prompt_index") == number
        ]  # fmt: skip
        tokens = [
            i for i, c in enumerate(chunks)
            if c["choices"] and c["choices"][0]["index"] // 2 == number
        ]  # fmt: skip
        progress = [chunks[i]["prompt_progress"] for i in mine]
        assert progress[-1]["processed"] == progress[-1]["total"] == len(prompt)
        assert max(mine) < min(tokens)


def test_return_progress_must_be_a_boolean_and_asks_nothing_without_stream(server):
    client, _ = server
    for path, body in [
        ("/v1/completions", {"prompt": "abc"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "abc"}]}),
    ]:
        for value in ("yes", 1, None):
            response = client.post(path, json={"model": MODEL, **body, "return_progress": value})
            assert response.status_code == 400, value
            error = response.json()["error"]
            assert error["param"] == "return_progress" and error["type"] == "invalid_request_error"
            assert "boolean" in error["message"] and set(error) == {"message", "type", "param",
                                                                    "code"}  # fmt: skip
        # as llama.cpp: progress is a streaming thing; a plain answer is unchanged
        response = client.post(path, json={"model": MODEL, **body, "max_tokens": 2,
                                           "return_progress": True})  # fmt: skip
        assert response.status_code == 200 and "prompt_progress" not in response.text


def test_progress_chunks_leave_the_metrics_alone(server):
    client, _ = server
    stream(client, "/v1/completions", prompt=PROMPT, max_tokens=3, ignore_eos=True,
           return_progress=True)  # fmt: skip
    families = text_string_to_metric_families(client.get("/metrics").text)
    samples = {s.name: s.value for f in families for s in f.samples if not s.labels.get("le")}
    assert samples["lln:time_to_first_token_seconds_count"] == 1
    assert samples["lln:generation_tokens_total"] == 3


def test_the_openai_sdk_reads_a_stream_with_progress(server):
    client, _ = server
    sdk = openai.OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client)
    chunks = list(sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=4,
        temperature=0, stream=True, extra_body={"return_progress": True},
    ))  # fmt: skip
    progress = [c for c in chunks if not c.choices]
    assert progress and all(c.model_extra["prompt_progress"]["total"] > 0 for c in progress)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) == 4 and chunks[-1].choices[0].finish_reason == "length"
    completion = list(sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=2, stream=True,
        extra_body={"return_progress": True, "ignore_eos": True},
    ))  # fmt: skip
    assert [c.model_extra["prompt_progress"]["processed"] for c in completion if not c.choices][
        -1
    ] == len(PROMPT)
    assert len([c for c in completion if c.choices]) == 2


# ---- lln-serve generate --------------------------------------------------------------------------


def generate(checkpoint, prompt: str, monkeypatch, min_tokens: int = 0) -> tuple[str, str]:
    """stdout and stderr of `lln-serve generate`; a bar from min_tokens (else the default)."""
    monkeypatch.setattr(cli, "PROGRESS_MIN_TOKENS", min_tokens or MIN_TOKENS)
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["generate", "--model", str(checkpoint), "--prompt", prompt, "--max-tokens", "8",
            "--dtype", "float32", "--gemm-dtype", "float32"]  # fmt: skip
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert cli.main(argv) == 0
    return stdout.getvalue(), stderr.getvalue()


def test_generate_shows_a_prefill_bar_on_stderr_for_a_long_prompt(tmp_path, monkeypatch):
    checkpoint = tiny_checkpoint(tmp_path)
    prompt = "the quick brown fox jumps over the lazy dog. " * 50  # 2,250 tokens
    assert len(prompt) > MIN_TOKENS == 2048
    whole, quiet = generate(checkpoint, prompt, monkeypatch, 10**9)  # one forward, no bar
    chunked, bar = generate(checkpoint, prompt, monkeypatch)
    assert chunked == whole and whole.strip()  # stdout: the answer alone, unchanged
    assert "prefill" not in quiet + whole
    assert "prefill: 100%" in bar and f"{len(prompt)}/{len(prompt)}" in bar
    assert f"{cli.PROGRESS_CHUNK}/{len(prompt)}" in bar  # it moved chunk by chunk
    short, none = generate(checkpoint, "the fox", monkeypatch)
    assert "prefill" not in none and short.strip()
