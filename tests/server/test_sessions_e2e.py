"""Sessions across `lln-serve serve` processes sharing a real redis-server (tiny random model in
a temp checkpoint, greedy): a conversation alternating between two servers equals one server
re-sending it whole, and prefills only each turn's new tokens; `kill -9` mid-stream loses
nothing finished and never leaves a corrupt state; Redis stopped and restarted under traffic."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
import torch

from tests.conftest import make_char_tokenizer
from tests.models.conftest import tiny_model
from tests.server.conftest import ServeProcess

NO_SPECIAL = {"0": -100, "1": -100}  # no [UNK] or </s>: every output token is one character


class Server(ServeProcess):
    """`lln-serve serve` on the checkpoint, its sessions in Redis (2 s lock expiry)."""

    def __init__(self, checkpoint, redis_url: str) -> None:
        args = ["--model", str(checkpoint), "--compile", "0", "--max-num-seqs", "4",
                "--served-model-name", "tiny", "--state-store", redis_url,
                "--session-lock-ttl", "2"]  # fmt: skip
        super().__init__(args, {"OMP_NUM_THREADS": "1"})

    def wait_ready(self, seconds: float = 120) -> Server:
        super().wait_ready(seconds)
        return self

    def complete(self, prompt: str, session: str | None = None, max_tokens: int = 5):
        body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "logit_bias": NO_SPECIAL, "ignore_eos": True}  # fmt: skip
        if session is not None:
            body["session_id"] = session
        return httpx.post(f"{self.url}/v1/completions", json=body, timeout=60)

    def prefilled(self) -> float:
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith("lln:prefill_computed_tokens_total"):
                return float(line.split()[-1])
        raise AssertionError("no prefill counter")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-checkpoint")
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=29, local_size=4, num_sinks=1,
                       sparse_cache_size=3, sparse_span=1)  # fmt: skip
    model.save_pretrained(path)
    make_char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def servers(checkpoint, redis_process):
    started = [Server(checkpoint, redis_process.url) for _ in range(2)]
    ready = list(started)  # a test may replace one (a restart): every one is stopped
    try:
        for server in started:
            server.wait_ready()
        yield ready
    finally:
        for server in {*started, *ready}:
            server.stop()


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_a_conversation_alternating_between_servers_equals_one_server_in_one_go(servers):
    a, b = servers
    turns, history, outputs = ["hello wor", "ld and", " more", "x"], "", []
    before = a.prefilled() + b.prefilled()
    for i, new in enumerate(turns):
        out = text_of((a if i % 2 == 0 else b).complete(new, session="conv"))
        outputs.append(out)
    computed = a.prefilled() + b.prefilled() - before
    # each turn prefills its new tokens, and the previous turn's last token
    assert computed == sum(len(t) for t in turns) + len(turns) - 1
    for i, new in enumerate(turns):  # one server, each turn's whole conversation re-sent
        history += new
        assert text_of(a.complete(history)) == outputs[i]
        history += outputs[i]


def test_kill_9_mid_stream_keeps_finished_sessions_and_no_corrupt_state(
    servers, checkpoint, redis_process
):
    a, b = servers
    histories = {}
    for name in ("k1", "k2", "k3", "cut"):
        histories[name] = f"{name} says " + text_of(a.complete(f"{name} says ", session=name))
    histories["k1"] += "again" + text_of(b.complete("again", session="k1"))
    body = {"model": "tiny", "prompt": " and on", "max_tokens": 2000, "temperature": 0,
            "session_id": "cut", "stream": True, "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{a.url}/v1/completions", json=body, timeout=60) as stream:
        next(stream.iter_lines())  # streaming has begun
        a.process.send_signal(signal.SIGKILL)
    a.process.wait(timeout=10)
    fresh = Server(checkpoint, redis_process.url).wait_ready()  # a new process (a restart)
    servers[0] = fresh
    for name in ("k1", "k2", "k3"):  # every finished turn is there
        continued = text_of(fresh.complete(" then", session=name))
        assert continued == text_of(fresh.complete(histories[name] + " then"))
    deadline = time.monotonic() + 15
    while (response := fresh.complete(" then", session="cut")).status_code == 409:
        assert "in use" in response.text  # until the dead server's lock expires (2 s)
        assert time.monotonic() < deadline, "the interrupted session stayed locked"
        time.sleep(0.5)
    # at its previous turn, as if the interrupted one never happened
    assert text_of(response) == text_of(fresh.complete(histories["cut"] + " then"))


def test_redis_stopped_and_restarted_under_traffic(servers, redis_process):
    server = servers[1]
    history = "once " + text_of(server.complete("once ", session="r"))
    statuses, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            statuses.append(server.complete("plain", max_tokens=2).status_code)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        redis_process.stop()
        response = server.complete("more", session="r")
        assert response.status_code == 503 and "unreachable" in response.json()["error"]["message"]
        assert httpx.get(f"{server.url}/health").json()["status"] == "degraded"
        time.sleep(1)
        redis_process.start()
        deadline = time.monotonic() + 15
        while httpx.get(f"{server.url}/health").json()["status"] != "ok":
            assert time.monotonic() < deadline, "the server did not reconnect to Redis"
            time.sleep(0.2)
        continued = text_of(server.complete("more", session="r"))
    finally:
        stop.set()
        thread.join(timeout=60)
    assert continued == text_of(server.complete(history + "more"))
    assert statuses and set(statuses) == {200}
