"""A bounded shutdown: on SIGINT/SIGTERM open requests get `--shutdown-timeout` seconds, then
end with a 503 error (a stream: an error event, then [DONE]) and the process exits."""

import json
import signal
import time

import httpx
import pytest

from tests.server.conftest import ServeProcess
from tests.server.test_api import MODEL, model, server, tokenizer  # noqa: F401 (fixtures)
from tests.server.test_playground_browser import tiny_checkpoint

ENDLESS = {"model": MODEL, "prompt": "abc", "max_tokens": 100_000, "ignore_eos": True,
           "stream": True}  # fmt: skip


def data_lines(lines) -> list[str]:
    return [line[6:] for line in lines if line.startswith("data: ")]


def test_failing_open_requests_ends_streams_with_an_error_and_frees_their_slots(server):  # noqa: F811
    client, state = server
    engine = state.engine.engine
    with client.stream("POST", "/v1/completions", json=ENDLESS) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # running
        assert state.engine.fail_open_requests("the server is shutting down") == 1
        rest = data_lines(lines)
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["code"] == 503 and "shutting down" in error["message"]
    deadline = time.monotonic() + 10
    while engine.has_unfinished() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.has_unfinished()  # aborted: its slot is free
    assert state.engine.fail_open_requests("again") == 0


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_an_endless_stream_after_the_timeout_and_exits(tmp_path, stop):
    checkpoint = tiny_checkpoint(tmp_path / "tiny")
    args = ["--model", str(checkpoint), "--served-model-name", MODEL, "--compile", "0",
            "--max-num-seqs", "2", "--shutdown-timeout", "1"]  # fmt: skip
    process = ServeProcess(args, {"OMP_NUM_THREADS": "1"}).wait_ready(180)
    try:
        with httpx.stream("POST", f"{process.url}/v1/completions", json=ENDLESS,
                          timeout=60) as response:  # fmt: skip
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # running
            process.process.send_signal(stop)
            signalled = time.monotonic()
            rest = data_lines(lines)
        assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == 503
        assert process.process.wait(timeout=30) == 0
        assert 1 <= time.monotonic() - signalled < 15
        assert "Traceback" not in process.stderr_tail()
    finally:
        process.stop()
