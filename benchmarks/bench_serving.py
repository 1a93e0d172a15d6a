"""Serving benchmark: a streaming HTTP load generator against `lln-serve serve`, next to the
engine driven offline with the same workload, in one run.

    .venv/bin/python benchmarks/bench_serving.py [--quick] [--out benchmarks/results]

At each concurrency level C (1, 4, 16, 64), C clients keep one streaming completion each in
flight (synthetic prompts of --prompt-len token ids, --max-tokens generated with ignore_eos)
until 2C requests are done. Reported: time to first token and inter-token latency percentiles
and total generated tokens/s. The offline run feeds the same requests to the engine in-process,
C at a time; the server must keep at least 90% of its tokens/s. The server and the load
generator share this machine's 2 cores, so the HTTP numbers include the client's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from models.registry import DEFAULT_MODEL
from server.config import EngineConfig
from server.engine import LLMEngine
from server.request import SamplingParams
from server.serve import warm_up


def prompt(i: int, length: int) -> list[int]:
    gen = torch.Generator().manual_seed(i)
    return torch.randint(100, 40000, (length,), generator=gen).tolist()


async def client(url: str, jobs: asyncio.Queue, stats: dict, args) -> None:
    async with httpx.AsyncClient(timeout=600) as http:
        while not jobs.empty():
            i = jobs.get_nowait()
            body = {"model": DEFAULT_MODEL, "prompt": prompt(i, args.prompt_len),
                    "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0,
                    "stream": True}  # fmt: skip
            start, last = time.perf_counter(), None
            async with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {") or not json.loads(line[6:])["choices"]:
                        continue  # [DONE], or a usage chunk
                    now = time.perf_counter()
                    if last is None:
                        stats["ttft"].append(now - start)
                    else:
                        stats["itl"].append(now - last)
                    last = now
                    stats["tokens"] += 1


async def http_level(url: str, concurrency: int, args) -> dict:
    jobs: asyncio.Queue = asyncio.Queue()
    for i in range(2 * concurrency):
        jobs.put_nowait(i)
    stats = {"ttft": [], "itl": [], "tokens": 0}
    start = time.perf_counter()
    await asyncio.gather(*(client(url, jobs, stats, args) for _ in range(concurrency)))
    return {**stats, "seconds": time.perf_counter() - start}


def offline_level(engine: LLMEngine, concurrency: int, args) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    pending = list(range(2 * concurrency))[::-1]
    tokens, in_flight = 0, 0
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and in_flight < concurrency:
            i = pending.pop()
            engine.add_request(f"off-{concurrency}-{i}", prompt(i, args.prompt_len), params)
            in_flight += 1
        for out in engine.step():
            tokens += len(out.token_ids)
            in_flight -= out.finished
    return {"tokens": tokens, "seconds": time.perf_counter() - start}


def start_server(port: int, max_num_seqs: int, **settings: str) -> subprocess.Popen:
    """`lln-serve serve` as a process, once healthy; settings: more LLN_SERVE_* variables."""
    env = {**os.environ, "LLN_SERVE_PORT": str(port), "LLN_SERVE_MAX_NUM_SEQS": str(max_num_seqs),
           "LLN_SERVE_PREFIX_CACHE_MB": "0", **settings}  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            raise RuntimeError("the server exited")
        time.sleep(1)
    server.kill()
    raise RuntimeError("the server did not become healthy")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def report(http: dict, offline: dict, args, out: Path) -> str:
    lines = [
        f"# Serving {DEFAULT_MODEL} over HTTP (streaming), CPU float32, {torch.get_num_threads()} "
        f"threads",
        "",
        f"`.venv/bin/python benchmarks/bench_serving.py` on {time.strftime('%Y-%m-%d %H:%M')} "
        f"UTC. Prompts of {args.prompt_len} tokens, {args.max_tokens} generated each, 2C "
        "requests per level.",
        "",
        "| concurrency | HTTP tokens/s | offline engine tokens/s | HTTP / offline | TTFT p50 | "
        "TTFT p99 | ITL p50 | ITL p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    worst = 1e9
    for c, h in http.items():
        h_tps = h["tokens"] / h["seconds"]
        o_tps = offline[c]["tokens"] / offline[c]["seconds"]
        worst = min(worst, h_tps / o_tps)
        ms = [percentile(h[k], q) * 1e3 for k in ("ttft", "itl") for q in (0.5, 0.99)]
        lines.append(
            f"| {c} | {h_tps:.1f} | {o_tps:.1f} | {h_tps / o_tps:.2f} | "
            + " | ".join(f"{x:.0f} ms" for x in ms)
            + " |"
        )
    lines += ["", f"Lowest HTTP / offline ratio: {worst:.2f} (goal >= 0.90)."]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_serving.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    levels = [1, 4] if args.quick else [1, 4, 16, 64]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = start_server(port, max(levels))
    try:
        http = {c: asyncio.run(http_level(f"http://127.0.0.1:{port}", c, args)) for c in levels}
    finally:
        server.terminate()
        server.wait(timeout=60)
    print("http done", flush=True)
    engine = LLMEngine(EngineConfig(max_num_seqs=max(levels), prefix_cache_bytes=0))
    warm_up(engine)
    offline = {c: offline_level(engine, c, args) for c in levels}
    print(report(http, offline, args, args.out))


if __name__ == "__main__":
    main()
