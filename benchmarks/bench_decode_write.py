"""One batched decode step of the engine (gather, compiled forward, write-back) with the new
token written into a copy of each window and the whole state copied back, against the token
written in place and only its slot copied back; side by side in one run.

    .venv/bin/python benchmarks/bench_decode_write.py [--rows 16] [--context 600] [--steps 12]

Both modes run round-robin, step by step, on two slot pools holding the same states (machine
noise hits both alike); the table gives the median step and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from models.registry import DEFAULT_MODEL, from_checkpoint, resolve
from server.state_pool import StatePool


def filled_pool(model, rows: int, context: int) -> tuple[StatePool, list[int]]:
    pool = StatePool(model, rows)
    slots = [pool.allocate() for _ in range(rows)]
    prompt = torch.randint(0, 1000, (rows, context), generator=torch.Generator().manual_seed(0))
    _, states = model.forward_states(prompt)
    pool.scatter(slots, states)
    return pool, slots


def step_seconds(model, pool: StatePool, slots: list[int], ids, in_place: bool) -> float:
    start = time.perf_counter()
    _, states = model.forward_states(ids, pool.gather(slots), in_place=in_place)
    pool.scatter(slots, states, one_token=in_place)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--context", type=int, default=600)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = from_checkpoint(resolve(DEFAULT_MODEL))
    model.compile_decode()
    ids = torch.randint(0, 1000, (args.rows, 1), generator=torch.Generator().manual_seed(1))
    modes = {"copy + full write-back": False, "in place + one-slot write-back": True}
    times: dict[str, list[float]] = {name: [] for name in modes}
    with torch.no_grad():
        pools = {name: filled_pool(model, args.rows, args.context) for name in modes}
        for step in range(args.steps + 2):  # the first two compile and warm up
            for name, in_place in modes.items():
                seconds = step_seconds(model, *pools[name], ids, in_place)
                if step >= 2:
                    times[name].append(seconds)
    base = statistics.median(times["copy + full write-back"])
    lines = [
        f"One decode step of {args.rows} rows at context {args.context}, default model "
        f"(window {model.config.local_size} + {model.config.num_sinks} sinks), CPU float32, "
        f"2 threads, compiled; median of {args.steps} round-robin steps.",
        "",
        "| decode step | ms | speed-up |",
        "|---|---|---|",
    ]
    for name, samples in times.items():
        median = statistics.median(samples)
        lines.append(f"| {name} | {median * 1e3:.1f} | {base / median:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_decode_write.md").write_text(text)


if __name__ == "__main__":
    main()
