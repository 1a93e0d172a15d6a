"""Perplexity of the default model with int8 weights next to float32, through both paths a
request takes: prefill (whole windows: many rows per matmul, the bfloat16 GEMM) and decode (each
window's last tokens fed 4 at a time: the few-row int8 kernels, PyTorch's `_weight_int8pack_mm`
or lln-serve's VNNI GEMV; or 8 at a time: lln-serve's AMX GEMM, which a decode batch of 5-16
sequences takes).

    .venv/bin/python benchmarks/eval_int8.py [--windows 1024 4096] [--tail 256]

Text: /usr/share/common-licenses/GPL-3 (held out, as `eval_perplexity.py`). Writes
benchmarks/results/int8_perplexity.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from models import int8_kernel
from models.evaluate import EVALUATION_FILE, evaluation_text, perplexity
from models.quantize import MIN_AMX_ROWS, quantize_int8
from models.registry import DEFAULT_MODEL, from_checkpoint, load_model, resolve

VARIANTS = {  # name -> None (float32) or (the int8 layers' vnni flag, decode tokens per forward)
    "float32": None,
    "int8, _weight_int8pack_mm decode": (False, 4),
    "int8, VNNI GEMV decode (activations in int8 groups of 16)": (True, 4),
    "int8, AMX GEMM decode (the same groups; 8 tokens per forward)": (True, 8),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--tail", type=int, default=256, help="tokens decoded per window")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    path = resolve(DEFAULT_MODEL)
    _, tokenizer = load_model(DEFAULT_MODEL, progress=False)
    ids = torch.tensor(tokenizer(evaluation_text())["input_ids"])
    columns = [f"{w} prefill" for w in args.windows] + [f"{w} decode" for w in args.windows]
    lines = [
        f"# int8 perplexity of {DEFAULT_MODEL} ({EVALUATION_FILE}, {ids.numel()} tokens)",
        "",
        f"`.venv/bin/python benchmarks/eval_int8.py` on {time.strftime('%Y-%m-%d %H:%M')} UTC. "
        "Non-overlapping windows, each from an empty state. *prefill*: every token of each "
        f"window scored from one forward pass. *decode*: each window's last {args.tail} tokens "
        "fed 4 (or 8) at a time after a prefill of the rest, and only they scored. In brackets: "
        "the ratio to float32 on the same tokens.",
        "",
        "| variant | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    baseline = None
    prefill: dict[bool, list[float]] = {}  # by int8: the bfloat16 GEMM whatever decode runs
    for name, variant in VARIANTS.items():
        vnni, piece = variant or (None, 4)
        kernel_runs = int8_kernel.amx_available if piece >= MIN_AMX_ROWS else int8_kernel.available
        if vnni and not kernel_runs():
            lines.append(f"| {name} | " + " | ".join("n/a" for _ in columns) + " |")
            continue
        int8 = variant is not None
        model = from_checkpoint(path)
        if int8:
            quantize_int8(model, vnni=vnni)
        with torch.no_grad():
            if int8 not in prefill:
                prefill[int8] = [perplexity(model, ids, window=w) for w in args.windows]
            scores = prefill[int8] + [
                perplexity(model, ids, window=w, decode_tail=args.tail, piece=piece)
                for w in args.windows
            ]
        baseline = baseline or scores
        cells = [f"{s:.3f} ({s / b:.4f}x)" for s, b in zip(scores, baseline, strict=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8_perplexity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
