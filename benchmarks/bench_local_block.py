"""Prefill of the default model (LLN+Diag) against the local branch's query block size, side by
side in one run: blocks as wide as the window (C = W, the layout before) and narrower ones.

    .venv/bin/python benchmarks/bench_local_block.py [--tokens 4096] [--rounds 5]

Each block of C queries scores W + C keys, so C = W doubles the local work per query; smaller
blocks do less arithmetic in more, smaller matrix products. Runs are round-robin over the
sizes (machine noise hits all alike); the table gives the median and the ratio to C = W.
Outputs of every size are checked against C = W before timing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import lln_core.ops.softmax as local_softmax
from models.registry import DEFAULT_MODEL, from_checkpoint, resolve


def prefill_seconds(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model.forward_states(ids, logits_to_keep=1)
    return time.perf_counter() - start


def check_same_outputs(model, ids: torch.Tensor, blocks: list[int]) -> None:
    outputs = {}
    for block in blocks:
        local_softmax.QUERY_BLOCK = block
        outputs[block] = model.forward_states(ids, logits_to_keep=16)[0]
    reference = outputs[blocks[0]]
    for block, logits in outputs.items():
        err = (logits - reference).abs().max().item()
        if err > 1e-3:
            raise AssertionError(f"query block {block}: logits differ by {err}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = from_checkpoint(resolve(DEFAULT_MODEL))
    window = model.config.local_size
    blocks = [window, 128, 64, 32]
    ids = torch.randint(
        0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0)
    )
    default_block = local_softmax.QUERY_BLOCK
    times: dict[int, list[float]] = {block: [] for block in blocks}
    with torch.inference_mode():
        check_same_outputs(model, ids[:, :1024], blocks)
        for _ in range(args.rounds):
            for block in blocks:
                local_softmax.QUERY_BLOCK = block
                times[block].append(prefill_seconds(model, ids))
    local_softmax.QUERY_BLOCK = default_block
    base = statistics.median(times[window])
    lines = [
        f"Prefill of {args.tokens:,} tokens, default model (window {window} + "
        f"{model.config.num_sinks} sinks), batch 1, CPU float32, 2 threads; median of "
        f"{args.rounds} round-robin runs. Default QUERY_BLOCK = {default_block}.",
        "",
        "| query block C | keys per query block | prefill tok/s | speed-up vs C = W |",
        "|---|---|---|---|",
    ]
    for block, samples in times.items():
        median = statistics.median(samples)
        keys = window + block + model.config.num_sinks
        label = f"{block} (= W)" if block == window else str(block)
        lines.append(f"| {label} | {keys} | {args.tokens / median:.0f} | {base / median:.2f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_local_block.md").write_text(text)


if __name__ == "__main__":
    main()
