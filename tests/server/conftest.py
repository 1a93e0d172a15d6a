"""Shared by the server tests: `lln-serve serve` as a process, and a real redis-server, each on
a free loopback port."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import redis
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as token_models
from transformers import PreTrainedTokenizerFast


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m server.cli serve ARGS --port P` on a free port; its stderr goes to a file
    (a pipe nobody reads would block a chatty server), shown when it fails."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "server.cli", "serve", *args, "--port", str(self.port)]
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by stop)
        self.process = subprocess.Popen(command, env={**os.environ, **(env or {})},
                                        stdout=subprocess.DEVNULL, stderr=self.log)  # fmt: skip

    def stderr_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:]

    def wait_ready(self, seconds: float) -> ServeProcess:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited: {self.stderr_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        pytest.fail(f"the server did not become healthy in {seconds:.0f} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def start_redis(
    binary: str,
    directory: Path,
    port: int,
    extra: list[str],
    password: str | None = None,
    seconds: float = 20,
) -> subprocess.Popen:
    """redis-server on 127.0.0.1:`port` (no snapshots, working files in `directory`, then the
    `extra` arguments), once it answers a PING (with `password` where it has requirepass).
    Its output goes to a file (a pipe nobody reads would block it), shown when it fails to
    start; then it is stopped and the test fails."""
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
            "--save", "", *extra]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=port, password=password, socket_connect_timeout=0.5)
        deadline = time.monotonic() + seconds
        try:
            while True:
                try:
                    client.ping()
                    return process
                except redis.ConnectionError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        stop_redis(process)
                        log.seek(0)
                        pytest.fail(f"redis-server did not start: {log.read()[-2000:]!r}")
                    time.sleep(0.05)
        finally:
            client.close()


def stop_redis(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=20)


class RedisProcess:
    """redis-server on 127.0.0.1 in a temp dir, with an append-only file (fsync always), so
    that a stop and a start keep what was written."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary, self.directory, self.port = binary, directory, free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = start_redis(self.binary, self.directory, self.port,
                                   ["--appendonly", "yes", "--appendfsync", "always",
                                    "--protected-mode", "no"])  # fmt: skip

    def stop(self) -> None:
        if self.process is not None:
            stop_redis(self.process)
        self.process = None

    def flush(self) -> None:
        client = redis.Redis(port=self.port)
        client.flushall()
        client.close()


@pytest.fixture(scope="session")
def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not found: install Debian's redis-server (`make tools` does it)")
    return binary


@pytest.fixture(scope="module")
def redis_process(redis_binary, tmp_path_factory):
    server = RedisProcess(redis_binary, tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_process) -> str:
    """A running, empty Redis."""
    if redis_process.process is None:
        redis_process.start()
    redis_process.flush()
    return redis_process.url


def byte_level_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A 257-token tokenizer (every byte, and </s> as 0) for grammar and template tests."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"</s>": 0, **{c: 1 + i for i, c in enumerate(alphabet)}}
    tokenizer = Tokenizer(token_models.BPE(vocab, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["</s>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>")
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf
