"""Sessions through Redis on the default model: save / restore latency, and the time to first
token of continuing a conversation from Redis against re-sending and re-prefilling it.

    .venv/bin/python benchmarks/bench_sessions.py [--lengths 1024 8192 32768] [--out DIR]

Starts a redis-server (Debian's) on a free loopback port in a temp dir, and the engine on the
default model (CPU float32, decode not compiled: only first tokens are timed). For each history
length L:

1. Re-prefill: a request whose prompt is the whole conversation (L tokens), no saved state:
   its time to first token (what a server without sessions does on every turn). This request
   carries a session id, so its state is saved to Redis when it ends.
2. Continuation: the next turn (16 new tokens) with the session id: the state is loaded from
   Redis (lock, GET, checksum, decode), restored into a slot, and only the new tokens (plus the
   pending one) are prefilled. Its time to first token, median of several turns.
3. Save / restore through Redis: the store's own operations on that state, median and p99 of
   many rounds (restore = lock + GET + verify + decode; save = encode + SET + swap + unlock).

The state has the same size at every length, so 3. should not depend on L.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import torch

from models.registry import DEFAULT_MODEL
from server.config import EngineConfig
from server.engine import LLMEngine
from server.request import SamplingParams

# two tokens: the first is timed; the state is saved after the second (as a real turn would)
FIRST_TOKEN = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
NEW_TURN = 16


def start_redis(directory: str) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: `make tools` or apt-get install redis-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir",
                                directory, "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL)  # fmt: skip
    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return process, f"redis://127.0.0.1:{port}/0"


def first_token_seconds(engine: LLMEngine, request_id: str, prompt: list[int], session: str):
    started = time.perf_counter()
    engine.add_request(request_id, prompt, FIRST_TOKEN, session)
    elapsed = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.token_ids and elapsed is None:
                elapsed = time.perf_counter() - started
    return elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def store_rounds(engine: LLMEngine, session_id: str, rounds: int) -> tuple[list, list]:
    store, loads, saves = engine.sessions, [], []
    for _ in range(rounds):
        started = time.perf_counter()
        session = store.acquire(session_id)
        loads.append(time.perf_counter() - started)
        started = time.perf_counter()
        store.release(session_id, session)
        saves.append(time.perf_counter() - started)
    return loads, saves


def run_length(engine: LLMEngine, length: int, turns: int, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(length)
    history = torch.randint(100, 40000, (length,), generator=gen).tolist()
    session = f"bench-{length}"
    prefill = first_token_seconds(engine, f"{session}-0", history, session)
    continuation = []
    for turn in range(turns):
        new = torch.randint(100, 40000, (NEW_TURN,), generator=gen).tolist()
        continuation.append(first_token_seconds(engine, f"{session}-{turn + 1}", new, session))
    loads, saves = store_rounds(engine, session, rounds)
    row = dict(
        length=length, prefill=prefill, continuation=statistics.median(continuation),
        load_median=statistics.median(loads), load_p99=percentile(loads, 0.99),
        save_median=statistics.median(saves), save_p99=percentile(saves, 0.99),
        state_mib=engine.pool.bytes_per_slot / 2**20,
    )  # fmt: skip
    row["speedup"] = row["prefill"] / row["continuation"]
    print(row, flush=True)
    return row


def report(rows: list[dict], turns: int, rounds: int, redis_version: str) -> str:
    lines = [
        "# Sessions through Redis (`benchmarks/bench_sessions.py`)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {DEFAULT_MODEL} on CPU float32, "
        f"{torch.get_num_threads()} threads; redis-server {redis_version} on loopback; state "
        f"{rows[0]['state_mib']:.1f} MiB per session. Re-prefill: one request of the whole "
        f"history; continuation: median of {turns} turns of {NEW_TURN} new tokens; save / "
        f"restore: {rounds} rounds each.",
        "",
        "| history | re-prefill TTFT | continuation TTFT | speed-up | restore median | "
        "restore p99 | save median | save p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['length']:,} tokens | {r['prefill']:.2f} s | {r['continuation'] * 1000:.0f} ms"
            f" | {r['speedup']:.0f}x | {r['load_median'] * 1000:.1f} ms | "
            f"{r['load_p99'] * 1000:.1f} ms | {r['save_median'] * 1000:.1f} ms | "
            f"{r['save_p99'] * 1000:.1f} ms |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        process, url = start_redis(directory)
        try:
            config = EngineConfig(model=DEFAULT_MODEL, max_num_seqs=2, compile_decode=False,
                                  prefix_cache_bytes=0, state_store=url)  # fmt: skip
            engine = LLMEngine(config)
            version = redis.Redis.from_url(url).info()["redis_version"]
            rows = [run_length(engine, n, args.turns, args.rounds) for n in args.lengths]
            engine.sessions.close()
        finally:
            process.terminate()
            process.wait()
    text = report(rows, args.turns, args.rounds, version)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_sessions.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
