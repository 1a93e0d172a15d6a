"""Reliability under load and faults, against `lln-serve serve` as a process on the default
model, in one run:

    .venv/bin/python benchmarks/bench_reliability.py [--requests 2000] [--out benchmarks/results]

1. Soak: --requests mixed requests (completions and chat, streamed or not, prompts of 1-60
   words, max_tokens 1-24, 10% of clients dropping mid-request), 16 at a time, with the
   server's RSS sampled every second: it must be flat once the caches have filled.
2. Storm: 200 streaming clients that drop after their first chunk; then the slots must all be
   free again (lln:num_requests_running back to 0).
3. Overload: 10x the slots at once against a short queue: the excess is shed with 503 +
   Retry-After, and every admitted request completes.
4. Greedy outputs of fixed prompts before and after all of it must be identical.

Writes benchmarks/results/bench_reliability.md and bench_reliability.png (RSS over time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import time
from pathlib import Path

import httpx
import matplotlib
from bench_serving import start_server  # benchmarks/, the script's folder

from models.registry import DEFAULT_MODEL

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SLOTS, QUEUE = 8, 32
WORDS = [
    "state",
    "window",
    "cache",
    "token",
    "model",
    "server",
    "request",
    "memory",
    "answer",
    "number",
    "river",
    "stone",
    "light",
    "garden",
    "paper",
    "music",
    "city",
    "winter",
]
LIMITS = httpx.Limits(max_connections=1000)  # every client on its own connection, at once
GREEDY_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def gauge(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def random_request(rng: random.Random) -> tuple[str, dict]:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 60)))
    fields = {"model": DEFAULT_MODEL, "max_tokens": rng.randint(1, 24),
              "stream": rng.random() < 0.5, "temperature": rng.choice([0.0, 0.8])}  # fmt: skip
    if rng.random() < 0.5:
        return "/v1/completions", {**fields, "prompt": text}
    return "/v1/chat/completions", {**fields, "messages": [{"role": "user", "content": text}]}


async def one_request(client: httpx.AsyncClient, path: str, body: dict, drop_after: float | None):
    """Status code (or "dropped"); a dropping client goes away after drop_after seconds."""

    async def call():
        if body["stream"]:
            async with client.stream("POST", path, json=body) as response:
                async for _ in response.aiter_lines():
                    pass
                return response.status_code
        return (await client.post(path, json=body)).status_code

    if drop_after is None:
        return await call()
    try:
        return await asyncio.wait_for(call(), drop_after)
    except TimeoutError:
        return "dropped"


async def soak(url: str, pid: int, total: int, seed: int) -> dict:
    rng = random.Random(seed)
    jobs = [(*random_request(rng), rng.uniform(0.05, 2.0) if rng.random() < 0.1 else None)
            for _ in range(total)]  # fmt: skip
    statuses: dict = {}
    samples: list[tuple[float, float]] = []
    began = time.monotonic()
    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker(client):
        while not queue.empty():
            path, body, drop = queue.get_nowait()
            try:
                status = await one_request(client, path, body, drop)
            except httpx.HTTPError as error:
                status = type(error).__name__
            statuses[status] = statuses.get(status, 0) + 1

    async def sampler(done: asyncio.Event):
        while not done.is_set():
            samples.append((time.monotonic() - began, rss_mib(pid)))
            await asyncio.sleep(1.0)

    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=LIMITS) as client:
        watcher = asyncio.create_task(sampler(done))
        await asyncio.gather(*(worker(client) for _ in range(16)))
        done.set()
        await watcher
    return {"statuses": statuses, "samples": samples, "seconds": time.monotonic() - began}


async def storm(url: str) -> dict:
    body = {"model": DEFAULT_MODEL, "prompt": "Tell me a long story", "max_tokens": 200,
            "stream": True}  # fmt: skip

    async def drop_after_first_chunk(client):
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for _ in response.aiter_lines():
                    return response.status_code
        except httpx.HTTPError as error:
            return type(error).__name__

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=LIMITS) as client:
        results = await asyncio.gather(*(drop_after_first_chunk(client) for _ in range(200)))
    began = time.monotonic()
    while gauge(url, "lln:num_requests_running") > 0 and time.monotonic() - began < 120:
        await asyncio.sleep(0.2)
    return {"statuses": {s: results.count(s) for s in set(results)},
            "running_after": gauge(url, "lln:num_requests_running"),
            "seconds_to_free": time.monotonic() - began}  # fmt: skip


async def overload(url: str) -> dict:
    body = {"model": DEFAULT_MODEL, "prompt": "Count to ten:", "max_tokens": 16}
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=LIMITS) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/completions", json=body) for _ in range(10 * (SLOTS + QUEUE)))
        )
    shed = [r for r in responses if r.status_code == 503]
    done = [r for r in responses if r.status_code == 200]
    complete = all(r.json()["choices"][0]["finish_reason"] in ("stop", "length") for r in done)
    return {
        "sent": len(responses), "served": len(done), "shed": len(shed),
        "shed_with_retry_after": sum("retry-after" in r.headers for r in shed),
        "other": len(responses) - len(done) - len(shed), "all_served_complete": complete,
    }  # fmt: skip


def greedy(url: str) -> list[str]:
    out = []
    for prompt in GREEDY_PROMPTS:
        body = {"model": DEFAULT_MODEL, "prompt": prompt, "max_tokens": 24, "temperature": 0}
        out.append(httpx.post(f"{url}/v1/completions", json=body, timeout=600).json()
                   ["choices"][0]["text"])  # fmt: skip
    return out


def outcomes(statuses: dict) -> str:
    """{status or outcome: count} as text (keys are status codes and words)."""
    return ", ".join(f"{key}: {count}" for key, count in sorted(statuses.items(), key=str))


def report(results: dict, args, out: Path) -> str:
    samples = results["soak"]["samples"]
    rss = [r for _, r in samples]
    settled = rss[len(rss) // 4 :] or rss  # after the caches fill
    lines = [
        f"# Reliability of `lln-serve serve` ({DEFAULT_MODEL}, CPU, {SLOTS} slots, queue {QUEUE})",
        "",
        f"`.venv/bin/python benchmarks/bench_reliability.py --requests {args.requests}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} UTC.",
        "",
        f"- Soak: {args.requests} mixed requests in {results['soak']['seconds']:.0f} s, 16 "
        f"clients; outcomes {outcomes(results['soak']['statuses'])}. RSS "
        f"{rss[0]:.0f} MiB at start, {min(settled):.0f}-{max(settled):.0f} MiB over the last "
        f"three quarters (max / min = {max(settled) / min(settled):.3f}).",
        f"- Storm: 200 streaming clients dropping after their first chunk: "
        f"{outcomes(results['storm']['statuses'])}; sequences running "
        f"afterwards {results['storm']['running_after']:.0f} (free after "
        f"{results['storm']['seconds_to_free']:.1f} s).",
        f"- Overload: {json.dumps(results['overload'], sort_keys=True)}.",
        f"- Greedy outputs before and after identical: {results['greedy_same']}.",
    ]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_reliability.md").write_text(text)
    plt.figure(figsize=(6, 3.2))
    plt.plot([t for t, _ in samples], rss)
    plt.xlabel("seconds into the soak")
    plt.ylabel("server RSS, MiB")
    plt.title(f"{args.requests} mixed requests, 16 clients")
    plt.ylim(bottom=0)
    plt.tight_layout()
    plt.savefig(out / "bench_reliability.png", dpi=120)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = start_server(port, SLOTS, LLN_SERVE_MAX_WAITING=str(QUEUE),
                          LLN_SERVE_PREFIX_CACHE_MB="256")  # fmt: skip
    try:
        before = greedy(url)
        results = {"soak": asyncio.run(soak(url, server.pid, args.requests, args.seed))}
        print("soak", results["soak"]["statuses"], flush=True)
        results["storm"] = asyncio.run(storm(url))
        print("storm", results["storm"], flush=True)
        results["overload"] = asyncio.run(overload(url))
        print("overload", results["overload"], flush=True)
        results["greedy_same"] = greedy(url) == before
        print(report(results, args, args.out))
    finally:
        server.terminate()
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
