"""Decode on a shared CPU: one sequence's engine decode step alone and with another process
busy on the same cores, per thread count and OpenMP wait policy.

    .venv/bin/python benchmarks/bench_shared_cpu.py

Each setting runs in its own process (OpenMP reads its wait policy once, when torch loads):
it builds the engine, compiles and warms the decode step, then, once the competitor (a
process doing float32 matmuls on every core) has started where the setting asks for one,
times 40 greedy decode steps of a 64-token prompt; the median is reported. Settings alternate
over --rounds. Results: benchmarks/results/bench_shared_cpu.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import statistics, sys
sys.path[:0] = [{root!r}, {bench!r}]
import torch
torch.set_num_threads({threads})
from bench_engine import make_engine, step_times
engine = make_engine(1, "cpu")
step_times(engine, 1, 8, "warm-1", prompt=64)
step_times(engine, 1, 8, "warm-2", prompt=64)
print("READY", flush=True)
sys.stdin.readline()
times = step_times(engine, 1, 42, "timed", prompt=64)[1:]  # 40: not the first after prefill
print("MS", statistics.median(times) * 1e3, flush=True)
"""

COMPETITOR = """
import torch
torch.set_num_threads({threads})
a = torch.randn(768, 768)
while True:
    a = torch.tanh(a @ a)
"""

# (label, decode threads, OpenMP environment, competitor); GOMP_SPINCOUNT: how long a thread
# spins at a barrier before it sleeps (libgomp: 300,000 by default, 1,000 when oversubscribed)
SETTINGS = [
    ("2 threads, alone", 2, {}, False),
    ("2 threads, busy neighbour", 2, {}, True),
    ("2 threads, passive wait, alone", 2, {"OMP_WAIT_POLICY": "PASSIVE"}, False),
    ("2 threads, passive wait, busy neighbour", 2, {"OMP_WAIT_POLICY": "PASSIVE"}, True),
    ("2 threads, spin 10,000, alone", 2, {"GOMP_SPINCOUNT": "10000"}, False),
    ("2 threads, spin 10,000, busy neighbour", 2, {"GOMP_SPINCOUNT": "10000"}, True),
    ("1 thread, alone", 1, {}, False),
    ("1 thread, busy neighbour", 1, {}, True),
]


def probe_ms(threads: int, openmp: dict[str, str], busy: bool, cores: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(openmp, OMP_NUM_THREADS=str(threads))
    code = PROBE.format(root=str(ROOT), bench=str(ROOT / "benchmarks"), threads=threads)
    probe = subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    competitor = None
    try:
        while (line := probe.stdout.readline()) and not line.startswith("READY"):
            pass
        if busy:
            competitor = subprocess.Popen(
                [sys.executable, "-c", COMPETITOR.format(threads=cores)],
                env={**env, "OMP_NUM_THREADS": str(cores)},
            )
            time.sleep(3)  # let it reach its loop
        probe.stdin.write("\n")
        probe.stdin.flush()
        for line in probe.stdout:
            if line.startswith("MS"):
                return float(line.split()[1])
        raise RuntimeError("the probe ended without a result")
    finally:
        if competitor is not None:
            competitor.kill()
        probe.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", nargs="+", help="run the settings whose label contains these")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    settings = [s for s in SETTINGS if not args.only or any(o in s[0] for o in args.only)]
    times: dict[str, list[float]] = {label: [] for label, *_ in settings}
    for _ in range(args.rounds):
        for label, threads, openmp, busy in settings:
            times[label].append(probe_ms(threads, openmp, busy, cores))
            print(label, f"{times[label][-1]:.1f} ms", flush=True)
    alone = statistics.median(times[settings[0][0]])
    command = "`.venv/bin/python benchmarks/bench_shared_cpu.py " + " ".join(sys.argv[1:]) + "`"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"# Decode on a shared CPU ({cores} cores)", "", f"{command} on {stamp}.", "",
        "One sequence's decode step (the engine's compiled step, default dtype), median of 40",
        f"steps, median over {args.rounds} rounds; the busy neighbour is a process doing float32",
        f"matmuls on all {cores} cores.", "",
        f"| setting | ms per token | vs {settings[0][0]} | rounds (ms) |", "|---|---|---|---|",
    ]  # fmt: skip
    for label, *_ in settings:
        ms = statistics.median(times[label])
        rounds = ", ".join(f"{t:.1f}" for t in times[label])
        lines.append(f"| {label} | {ms:.1f} | {ms / alone:.2f}x | {rounds} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_shared_cpu.md").write_text(text)


if __name__ == "__main__":
    main()
