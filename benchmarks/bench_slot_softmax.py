"""Decode attention over stored slots: the slot kernel (`torch.ops.lln.slot_softmax`) against
the same parts computed by PyTorch and compiled by inductor (what a compiled decode step ran
before), side by side in one run.

    .venv/bin/python benchmarks/bench_slot_softmax.py [--rounds 7]

Each case holds 30 layers' worth of distinct tensors (the default model's shapes: 3 KV heads,
3 queries each, head dim 64), so that the slots are read from memory as in a decode step;
both paths alternate round by round and the table gives the best round of each.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lln_core.ops import slot_softmax as ss
from lln_core.ops.common import slot_logits, slot_values

LAYERS = 30
CASES = [  # (rows, slots, dtype, what it is)
    (1, 452, torch.bfloat16, "window, bfloat16"),
    (1, 912, torch.bfloat16, "sparse cache, bfloat16"),
    (1, 452, torch.float32, "window, float32 (no cache)"),
    (16, 452, torch.bfloat16, "window, 16 sequences"),
    (16, 912, torch.bfloat16, "sparse cache, 16 sequences"),
]


def pytorch_parts(q, k, v, bias):
    logits = slot_logits(q, k) + bias[:, None, None, :]
    top = logits.amax(dim=-1)
    weights = torch.exp(logits - top[..., None])
    return slot_values(weights, v), weights.sum(-1), top


def seconds_per_step(fn, tensors, rounds: int) -> list[float]:
    """Per round: seconds for one call per layer (30 calls)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for args in tensors:
            fn(*args)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not ss.available():
        raise SystemExit("the slot kernel is not available here (AVX-512 and a C++ compiler)")
    compiled = torch.compile(pytorch_parts, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    for rows, slots, dtype, what in CASES:
        tensors = [
            (torch.randn(rows, 3, 3, 64, generator=gen) * 0.1,
             torch.randn(rows, 3, slots, 64, generator=gen).to(dtype),
             torch.randn(rows, 3, slots, 64, generator=gen).to(dtype),
             torch.zeros(rows, slots))
            for _ in range(LAYERS)
        ]  # fmt: skip
        paths = {"kernel": torch.ops.lln.slot_softmax, "compiled PyTorch": compiled}
        for fn in paths.values():  # warm up (and compile)
            seconds_per_step(fn, tensors, 2)
        best = {name: float("inf") for name in paths}
        with torch.no_grad():
            for _ in range(args.rounds):
                for name, fn in paths.items():
                    best[name] = min(best[name], min(seconds_per_step(fn, tensors, 1)))
        kernel, pytorch = best["kernel"] * 1e3, best["compiled PyTorch"] * 1e3
        rows_out.append(f"| {what} | {rows} | {slots} | {kernel:.2f} | {pytorch:.2f} | "
                        f"{pytorch / kernel:.2f}x |")  # fmt: skip
        print(rows_out[-1], flush=True)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    table = "\n".join([
        f"# Slot kernel against compiled PyTorch ({LAYERS} layers, 2 threads, {stamp})", "",
        "`.venv/bin/python benchmarks/bench_slot_softmax.py`; ms for one call per layer, best "
        f"of {args.rounds} interleaved rounds.", "",
        "| slots | rows | slots per row | kernel ms | compiled PyTorch ms | speed-up |",
        "|---|---|---|---|---|---|", *rows_out, "",
    ])  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_slot_softmax.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
