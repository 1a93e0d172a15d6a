"""The README's picture: state bytes per sequence against context length, beside a KV cache.

Reads the measured state sizes of `benchmarks/results/bench_model.md` (its "state MiB" columns:
each model's per-sequence state at every context the benchmark ran) and draws them on log axes
with the softmax model's KV cache, measured where the benchmark ran it and extended by its
per-token size (bytes grow linearly with the context) to 1M tokens.

    .venv/bin/python benchmarks/plot_state_memory.py [--results FILE] [--out docs/state-vs-kv.png]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_model.md"
OUT = ROOT / "docs" / "state-vs-kv.png"
LABELS = {
    "lln_diag": "smollm2-135m-lln: window + sinks + sparse cache + LLN state",
    "lln_diag, no sparse cache": "without the sparse cache (window + sinks + LLN state)",
    "lln": "LLN state alone",
    "softmax (transformers, KV cache)": "softmax KV cache, same shape (float32)",
}


def state_columns(markdown: str) -> tuple[list[int], dict[str, list[float | None]]]:
    """(contexts, {model: MiB per context or None}) from the benchmark's first table."""
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in rows[0].strip("|").split("|")]
    body = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]
    contexts = [int(re.sub(r"[^0-9]", "", row[0].split("(")[0])) for row in body]
    columns = {}
    for index, name in enumerate(header):
        if name.endswith(": state MiB"):
            model = name.removesuffix(": state MiB")
            columns[model] = [float(row[index]) if row[index] else None for row in body]
    return contexts, columns


def plot(results: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts, columns = state_columns(results.read_text())
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=120)
    for model, values in columns.items():
        points = [(c, v) for c, v in zip(contexts, values, strict=True) if v is not None]
        xs, ys = zip(*points, strict=True)
        label = LABELS.get(model, model)
        if model.startswith("softmax"):
            ax.plot(xs, ys, "o-", color="tab:red", label=label)
            per_token = ys[-1] / xs[-1]  # measured: linear in the context
            extended = "KV cache extended at its measured bytes per token"
            ax.plot([xs[-1], contexts[-1]], [ys[-1], per_token * contexts[-1]], "--",
                    color="tab:red", label=extended)  # fmt: skip
        else:
            ax.plot(xs, ys, "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("memory per sequence (MiB)")
    ax.set_title("State per sequence against context length (bench_model.md)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    plot(args.results, args.out)


if __name__ == "__main__":
    main()
