"""Perplexity over a long stream (StreamingLLM's check): the perplexity of each successive block
of 1,024 tokens of one long text fed through one sequence's state, against its position.

    .venv/bin/python benchmarks/bench_long_ppl.py --tokens 32768 --variants fixed rev8

The stream is The Debian Administrator's Handbook (never trained or calibrated on) from its
start, repeated if --tokens asks for more. Variants: `grouped` (the sparse cache's pairs at
grouped distances, at most 4096), revision 9 (`fixed`: every far key at one rotary distance),
revision 8 (`rev8`: far keys where they were written) and the softmax teacher
(`teacher`, full KV cache: its memory grows with the stream). Writes
benchmarks/results/bench_long_ppl.md and .png.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib
import torch
from eval_perplexity import load_variant  # benchmarks/, the script's folder
from transformers import AutoTokenizer

from models.evaluate import handbook_text
from models.registry import DEFAULT_MODEL, resolve

matplotlib.use("Agg")
import matplotlib.pyplot as plt

BLOCK = 1024
VARIANTS = {
    "fixed": ("revision 9 (every far key at distance 1024)", {"far_positions": "fixed"}),
    "grouped": (
        "sparse cache at grouped distances (g=8, at most 4096)",
        {"far_positions": "grouped", "far_group": 8, "far_max_distance": 4096},
    ),
    "rev8": ("revision 8 (far keys at their written positions)", {"far_positions": "original"}),
    "teacher": ("softmax teacher (full KV cache)", {"attention_kernel": "softmax"}),
}


@torch.no_grad()
def block_perplexities(model, ids: torch.Tensor) -> list[float]:
    """Perplexity of each block of BLOCK tokens of ids [N], fed in order through one state
    (the stream's first token is not scored: nothing predicts it)."""
    states, carried, result = None, None, []
    for start in range(0, ids.numel() - BLOCK + 1, BLOCK):
        block = ids[start : start + BLOCK]
        logits, states = model.forward_states(block[None], states)
        logits = logits[0].float()
        predictions = logits[:-1] if carried is None else torch.cat([carried, logits[:-1]])
        targets = block[1:] if carried is None else block
        nll = torch.nn.functional.cross_entropy(predictions, targets)
        result.append(math.exp(nll.item()))
        carried = logits[-1:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--variants", nargs="+", default=["fixed", "rev8"], choices=VARIANTS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_long_ppl"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    path = resolve(DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text_ids = tokenizer(handbook_text(), add_special_tokens=False).input_ids
    repeats = -(-args.tokens // len(text_ids))
    ids = torch.tensor((text_ids * repeats)[: args.tokens])
    curves = {}
    for key in args.variants:
        name, overrides = VARIANTS[key]
        began = time.perf_counter()
        curves[name] = block_perplexities(load_variant(path, overrides), ids)
        print(f"{name}: {time.perf_counter() - began:.0f} s", curves[name], flush=True)
    write(args, curves, len(text_ids))


def write(args, curves: dict[str, list[float]], text_tokens: int) -> None:
    ends = [(i + 1) * BLOCK for i in range(len(next(iter(curves.values()))))]
    marks = [i for i, end in enumerate(ends) if end in (2048, 4096, 8192) or end % 16384 == 0]
    lines = [
        "# Perplexity over a long stream",
        "",
        f"`benchmarks/bench_long_ppl.py --tokens {args.tokens} --variants "
        f"{' '.join(args.variants)}`: blocks of {BLOCK} tokens of The Debian Administrator's "
        f"Handbook ({text_tokens:,} tokens, repeated past that) through one state, float32.",
        "",
        "| variant | " + " | ".join(f"block ending at {ends[i]:,}" for i in marks) + " |",
        "|---|" + "---|" * len(marks),
    ]
    for name, ppl in curves.items():
        lines.append(f"| {name} | " + " | ".join(f"{ppl[i]:,.2f}" for i in marks) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ppl in curves.items():
        ax.plot(ends, ppl, label=name)
    ax.set(xscale="log", yscale="log", xlabel="position in the stream (tokens)",
           ylabel=f"perplexity of the {BLOCK}-token block")  # fmt: skip
    ax.axvline(8192, color="grey", linestyle=":", label="trained length (8K)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
