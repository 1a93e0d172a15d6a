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

With --tenants, only the two-tenant run (issue 37), against a server with a keys file:

    .venv/bin/python benchmarks/bench_reliability.py --tenants [--rounds 3 --victim-requests 35]

A steady tenant sends streamed requests one at a time; its time to first token is measured
alone, and while a flooding tenant (limit: 2 sequences at once) keeps 10x its limit in flight
(20 clients, in a process of their own), in alternating rounds (so that other load on the
machine weighs on both alike):
flooders that wait the Retry-After of each 429 (as the openai SDK does), and flooders that
retry 100 ms after each 429 (ignoring it); then once while the same flood comes from a tenant
without a limit (what the limit prevents). The steady tenant's p99 TTFT under the limited
flood must stay within 1.5x of its figure alone (p99 by nearest rank: over 100 samples it
is not the maximum alone, so one outlier does not decide it). Writes (or replaces) the section "Two
tenants" at the end of bench_reliability.md; the other runs keep it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import socket
import tempfile
import time
from pathlib import Path

import httpx
import matplotlib
from bench_serving import percentile, start_server  # benchmarks/, the script's folder

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
    path = out / "bench_reliability.md"
    (out / "bench_reliability.md").write_text(text + tenants_section(path))
    plt.figure(figsize=(6, 3.2))
    plt.plot([t for t, _ in samples], rss)
    plt.xlabel("seconds into the soak")
    plt.ylabel("server RSS, MiB")
    plt.title(f"{args.requests} mixed requests, 16 clients")
    plt.ylim(bottom=0)
    plt.tight_layout()
    plt.savefig(out / "bench_reliability.png", dpi=120)
    return text


# ---- two tenants -------------------------------------------------------------------------------

STEADY, FLOOD, FREE = "sk-bench-steady-01", "sk-bench-flood-001", "sk-bench-free-0001"
FLOOD_LIMIT, FLOOD_CLIENTS = 2, 20
STEADY_WORDS, FLOOD_WORDS, FLOOD_TOKENS, FLOOD_RETRY_S = 48, (24, 72), 32, 0.1
TENANT_KEYS = f"""{STEADY} steady
{FLOOD} flood max_concurrent={FLOOD_LIMIT}
{FREE} unlimited
"""


async def ttft(client: httpx.AsyncClient, key: str, body: dict) -> tuple[int, float | None]:
    """(status, seconds to the first token, or to a refusal's Retry-After) of one streamed
    completion."""
    started = time.perf_counter()
    headers = {"Authorization": f"Bearer {key}"}
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
        first = None
        if response.status_code == 429:
            return 429, float(response.headers.get("retry-after", "1"))
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {"):
                first = time.perf_counter() - started
        return response.status_code, first


async def steady_run(
    url: str, count: int, seed: int, flood_key: str | None, retry_s: float | None = None,
    clients: int = FLOOD_CLIENTS,
) -> dict:  # fmt: skip
    """`count` requests of the steady tenant, one at a time, while `flood_key` (if any) keeps
    `clients` requests in flight from a process of its own, retrying `retry_s` after a 429
    (None: its Retry-After)."""
    rng = random.Random(seed)
    flood = start_flood(url, flood_key, clients, retry_s, rng.random()) if flood_key else None
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=LIMITS) as client:
        await asyncio.sleep(3 if flood_key else 0)  # the flood is on before the first sample
        times, statuses = [], {}
        for _ in range(count):
            text = " ".join(rng.choice(WORDS) for _ in range(STEADY_WORDS))
            body = {"model": DEFAULT_MODEL, "prompt": text, "max_tokens": 4, "stream": True}
            status, first = await ttft(client, STEADY, body)
            statuses[status] = statuses.get(status, 0) + 1
            if first is not None:
                times.append(first)
    return {"ttft": times, "statuses": statuses, "flood": stop_flood(flood) if flood else {}}


# The flood runs in a process of its own with a bare HTTP/1.1 client (one keep-alive
# connection per flooding client, streamed responses read to their end): a flooder's own CPU
# is not the server's, and httpx in the steady tenant's event loop would cost the shared cores
# (and that loop's timing) far more per request than the server spends refusing it.


def start_flood(url: str, key: str, clients: int, retry_s: float | None, seed: float):
    context = multiprocessing.get_context("fork")  # before this process's event loop starts
    stop, results = context.Event(), context.Queue()
    port = int(url.rsplit(":", 1)[1])
    process = context.Process(target=flood_process, daemon=True,
                              args=(port, key, clients, retry_s, seed, stop, results))  # fmt: skip
    process.start()
    return process, stop, results


def stop_flood(flood) -> dict:
    """Stop the flood (its clients go away: the server aborts what they had); its outcomes."""
    process, stop, results = flood
    stop.set()
    statuses = results.get(timeout=60)
    process.join(timeout=60)
    return statuses


def flood_process(port, key, clients, retry_s, seed, stop, results) -> None:
    async def main() -> dict:
        rng, statuses = random.Random(seed), {}
        tasks = [asyncio.create_task(flood_client(port, key, rng.random(), retry_s, statuses))
                 for _ in range(clients)]  # fmt: skip
        while not stop.is_set():
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return statuses

    results.put(asyncio.run(main()))


async def flood_client(port: int, key: str, seed: float, retry_s: float | None,
                       out: dict) -> None:  # fmt: skip
    """Streamed completions one after another on a keep-alive connection; after a 429, wait
    its Retry-After (as the openai SDK does), or `retry_s`."""
    rng = random.Random(seed)
    reader = writer = None
    try:
        while True:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*FLOOD_WORDS)))
            body = json.dumps({"model": DEFAULT_MODEL, "prompt": text,
                               "max_tokens": FLOOD_TOKENS, "stream": True}).encode()  # fmt: skip
            head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
            retry_after = None
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(head + body)
                status, headers = await read_head(reader)
                if headers.get("transfer-encoding") == "chunked":
                    while size := int((await reader.readline()).split(b";")[0], 16):
                        await reader.readexactly(size + 2)
                    await reader.readline()
                else:
                    await reader.readexactly(int(headers.get("content-length", "0")))
                if status == 429:
                    retry_after = float(headers.get("retry-after", "1"))
                if headers.get("connection") == "close":
                    writer.close()
                    writer = None
            except (OSError, ValueError, asyncio.IncompleteReadError) as error:
                status, writer = type(error).__name__, None
            out[status] = out.get(status, 0) + 1
            if retry_after is not None:
                await asyncio.sleep(retry_after if retry_s is None else retry_s)
    finally:
        if writer is not None:
            writer.close()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The status and the headers (lower-cased names) of a response."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers


def merge_phase(total: dict, result: dict) -> None:
    total["ttft"] += result["ttft"]
    for field in ("statuses", "flood"):
        for status, count in result[field].items():
            total[field][status] = total[field].get(status, 0) + count


TENANTS_HEADING = "\n## Two tenants"


def tenants_section(path: Path) -> str:
    """The two-tenant section of a results file ("" if none)."""
    text = path.read_text() if path.exists() else ""
    return text[text.index(TENANTS_HEADING) :] if TENANTS_HEADING in text else ""


def write_tenants_section(path: Path, section: str) -> None:
    """Put `section` (it starts with TENANTS_HEADING) at the end of `path`, replacing the
    one there."""
    text = path.read_text() if path.exists() else ""
    head = text.split(TENANTS_HEADING, 1)[0].rstrip("\n")
    path.write_text(head + "\n" + section)


def tenants_report(phases: dict, args, out: Path) -> str:
    alone = percentile(phases["alone"]["ttft"], 0.99)
    rows = []
    labels = {
        "alone": "alone",
        "at_limit": f"the other tenant at its limit ({FLOOD_LIMIT} clients, no 429)",
        "limited": f"flood at 10x its limit of {FLOOD_LIMIT}, waiting Retry-After",
        "hostile": f"flood at 10x its limit, retrying after {FLOOD_RETRY_S:g} s",
        "unlimited": "the same flood (Retry-After), no limit",
    }
    for name, label in labels.items():
        phase = phases[name]
        p50, p99 = (percentile(phase["ttft"], q) * 1e3 for q in (0.5, 0.99))
        flood = outcomes(phase["flood"]) if phase["flood"] else "-"
        ratio = p99 / (alone * 1e3)
        rows.append(f"| {label} | {len(phase['ttft'])} | {p50:.0f} ms | {p99:.0f} ms | "
                    f"{ratio:.2f}x | {outcomes(phase['statuses'])} | {flood} |")  # fmt: skip
    ratio = percentile(phases["limited"]["ttft"], 0.99) / alone
    hostile = percentile(phases["hostile"]["ttft"], 0.99) / alone
    threads = (
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
        if "OMP_NUM_THREADS" in os.environ
        else ""
    )
    lines = [
        f"{TENANTS_HEADING} on `lln-serve serve` ({DEFAULT_MODEL}, CPU, {SLOTS} slots)",
        "",
        f"`{threads}.venv/bin/python benchmarks/bench_reliability.py --tenants --rounds "
        f"{args.rounds} "
        f"--victim-requests {args.victim_requests} --unlimited-requests "
        f"{args.unlimited_requests}` on {time.strftime('%Y-%m-%d %H:%M')} UTC (the load "
        "average at the end is below the table).",
        "",
        f"The steady tenant streams completions of {STEADY_WORDS} words (max_tokens 4) one at a "
        f"time; the flooding tenant keeps {FLOOD_CLIENTS} streamed completions "
        f"({FLOOD_WORDS[0]}-{FLOOD_WORDS[1]} words, max_tokens {FLOOD_TOKENS}) in flight, "
        "waiting each 429's Retry-After (as the openai SDK does) or, hostile, retrying "
        f"{FLOOD_RETRY_S * 1000:.0f} ms after it; its keys-file line: `flood max_concurrent="
        f"{FLOOD_LIMIT}`. The flood comes from a process of its own, a bare HTTP/1.1 client "
        "with a keep-alive connection per flooding client (its CPU is not the server's; the "
        "steady tenant's client is httpx, alone in its event loop). Alone, at-limit, limited "
        f"and hostile runs alternate, {args.rounds} rounds of {args.victim_requests} requests "
        f"each; the unlimited flood runs once, {args.unlimited_requests} requests. p99 is "
        "by nearest rank.",
        "",
        "| steady tenant's run | requests | TTFT p50 | TTFT p99 | p99 / alone | its outcomes | "
        "flood's outcomes |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Steady tenant's p99 TTFT under the limited flood: {ratio:.2f}x its figure alone "
        f"(goal <= 1.5x): {'met' if ratio <= 1.5 else 'NOT met'}; under the hostile flood that "
        f"ignores Retry-After: {hostile:.2f}x. The machine's load average "
        f"at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.",
    ]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    write_tenants_section(out / "bench_reliability.md", text)
    return text


def tenants_main(args, port: int) -> None:
    url = f"http://127.0.0.1:{port}"
    keys = Path(tempfile.mkdtemp()) / "keys"
    keys.write_text(TENANT_KEYS)
    server = start_server(port, SLOTS, LLN_SERVE_MAX_WAITING=str(QUEUE),
                          LLN_SERVE_API_KEYS_FILE=str(keys))  # fmt: skip
    try:
        asyncio.run(steady_run(url, 3, args.seed - 1, None))  # warm-up, not counted
        phases: dict = {}
        runs = [("alone", None, None, 0), ("at_limit", FLOOD, None, FLOOD_LIMIT),
                ("limited", FLOOD, None, FLOOD_CLIENTS),
                ("hostile", FLOOD, FLOOD_RETRY_S, FLOOD_CLIENTS)]  # fmt: skip
        runs = runs * args.rounds + [("unlimited", FREE, None, FLOOD_CLIENTS)]
        for number, (name, key, retry_s, clients) in enumerate(runs):
            count = args.unlimited_requests if name == "unlimited" else args.victim_requests
            run = steady_run(url, count, args.seed + number, key, retry_s, clients)
            result = asyncio.run(run)
            print(name, {k: v for k, v in result.items() if k != "ttft"},
                  f"p99 {percentile(result['ttft'], 0.99):.3f} s", flush=True)  # fmt: skip
            merge_phase(phases.setdefault(name, {"ttft": [], "statuses": {}, "flood": {}}),
                        result)  # fmt: skip
        print(tenants_report(phases, args, args.out))
    finally:
        server.terminate()
        server.wait(timeout=60)
        keys.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tenants", action="store_true", help="only the two-tenant run")
    parser.add_argument("--rounds", type=int, default=3, help="alone/flood rounds (--tenants)")
    parser.add_argument("--victim-requests", type=int, default=35, help="per round (--tenants)")
    parser.add_argument("--unlimited-requests", type=int, default=10, help="(--tenants)")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    if args.tenants:
        tenants_main(args, port)
        return
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
