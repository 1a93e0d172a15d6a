"""Quality of the default model with its sparse cache, one run: perplexity at 1K and 4K windows
of GPL-3 next to the softmax teacher and to revision 6 (the same model without the cache), and
by position bucket past the window on the 12 held-out test windows of eval_stage2_runs.py
(NLLs cached there) against revision 6 and the window alone, with 95% paired bootstrap
intervals over windows. Writes benchmarks/results/eval_sparse_ppl.md. With --gpl3-only
--variants NAME ...: only the GPL-3 table, for those variants (e.g. the shipped default and
revision 8, whose far keys keep the positions where they were written).

    .venv/bin/python benchmarks/eval_sparse_ppl.py
    .venv/bin/python benchmarks/eval_sparse_ppl.py --gpl3-only --variants default rev8 \
        --out benchmarks/results/eval_far_ppl.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from eval_perplexity import NO_SPARSE, load_variant  # benchmarks/, the script's folder
from eval_stage2_runs import (
    BUCKETS,
    RUNS,
    bucket_change,
    bucket_perplexity,
    default_cache,
    scoring_windows,
    variant_nll,
)

from models.evaluate import evaluation_text, perplexity
from models.registry import DEFAULT_MODEL, load_model, resolve

REVISION_6 = "revision 6 (no sparse cache)"
SHIPPED = f"{DEFAULT_MODEL} (sparse cache)"
VARIANTS = {
    "softmax teacher": dict(attention_kernel="softmax"),
    REVISION_6: dict(NO_SPARSE),
    SHIPPED: dict(),
}
REVISION_8 = "revision 8 (far keys at their written positions)"
REVISION_9 = "revision 9 (every far key at distance 1024)"
GROUPED = "sparse cache at grouped distances (g=8, at most 4096)"
CONVERTED = "converted, no training (calibrated LLN)"
CONVERTED_NO_LLN = "converted, no training, LLN part off"
CHOICES = {
    "teacher": "softmax teacher",
    "rev6": REVISION_6,
    "default": SHIPPED,
    "rev8": REVISION_8,
    "rev9": REVISION_9,
    "grouped": GROUPED,
    "converted": CONVERTED,
    "converted-nolln": CONVERTED_NO_LLN,
}
EXTRA = {
    REVISION_8: dict(far_positions="original"),
    REVISION_9: dict(far_positions="fixed"),
    GROUPED: dict(far_positions="grouped", far_group=8, far_max_distance=4096),
    CONVERTED: dict(calibrated=True),
    CONVERTED_NO_LLN: dict(calibrated=True, mix=float("-inf")),
}
HELDOUT = {  # eval_stage2_runs' parameter specs: None = window alone
    "window alone (LLN removed)": None,
    REVISION_6: RUNS / "B.safetensors",
    SHIPPED: ("sparse", RUNS / "B.safetensors"),
}


def gpl3_rows(path: Path, tokenizer, names: list[str] | None = None) -> list[str]:
    ids = torch.tensor(tokenizer(evaluation_text())["input_ids"])
    variants = {**VARIANTS, **EXTRA}
    rows = {}
    for name in names or VARIANTS:
        model = load_variant(path, variants[name])
        rows[name] = [perplexity(model, ids, window=n) for n in (1024, 4096)]
        print(name, rows[name], flush=True)
    base_name = "softmax teacher" if "softmax teacher" in rows else next(iter(rows))
    base = rows[base_name]
    lines = [f"| variant | ppl 1K | ppl 4K | x {base_name} 1K | x {base_name} 4K |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, (p1, p4) in rows.items():
        lines.append(f"| {name} | {p1:.2f} | {p4:.2f} | {p1 / base[0]:.4f} | {p4 / base[1]:.4f} |")
    return lines


def heldout_rows(path: Path, tokenizer) -> list[str]:
    windows = scoring_windows(tokenizer)["test"]
    cache = default_cache()
    nll = {name: variant_nll(path, spec, windows, cache) for name, spec in HELDOUT.items()}
    names = [f"{lo}-{hi}" for lo, hi in BUCKETS]
    lines = ["| variant | " + " | ".join(names) + " |", "|---" * (1 + len(names)) + "|"]
    for name, values in nll.items():
        cells = [f"{bucket_perplexity(values, lo, hi):.3f}" for lo, hi in BUCKETS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for base in (REVISION_6, "window alone (LLN removed)"):
        for lo, hi in BUCKETS:
            change, low, high, wins = bucket_change(nll[SHIPPED], nll[base], lo, hi)
            lines.append(
                f"- {lo}-{hi} against {base}: {100 * change:+.2f}% [{100 * low:+.2f}, "
                f"{100 * high:+.2f}], better in {100 * wins:.0f}% of windows"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpl3-only", action="store_true")
    parser.add_argument("--variants", nargs="+", choices=CHOICES, help="with --gpl3-only")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/eval_sparse_ppl.md"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    path = resolve(DEFAULT_MODEL)
    _, tokenizer = load_model(DEFAULT_MODEL, progress=False)
    if args.gpl3_only:
        names = [CHOICES[v] for v in args.variants or CHOICES]
        command = "benchmarks/eval_sparse_ppl.py --gpl3-only --variants " + " ".join(
            args.variants or CHOICES
        )
        lines = ["# Perplexity, GPL-3 windows of 1K and 4K tokens", "", f"`{command}`", "",
                 *gpl3_rows(path, tokenizer, names)]  # fmt: skip
        args.out.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    lines = [
        "# The sparse cache's perplexity cost", "",
        "`.venv/bin/python benchmarks/eval_sparse_ppl.py`", "",
        "GPL-3, windows of 1K and 4K tokens:", "", *gpl3_rows(path, tokenizer), "",
        "Held-out test windows (12 x 4,096 tokens), perplexity by position bucket:", "",
        *heldout_rows(path, tokenizer),
    ]  # fmt: skip
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
