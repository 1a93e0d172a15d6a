"""Perplexity at 1K and 4K windows of GPL-3 (held out): the default model with its sparse cache
next to the softmax teacher and to revision 6 (the same model without the cache), one run.

    .venv/bin/python benchmarks/eval_sparse_ppl.py
"""

from __future__ import annotations

import torch
from eval_perplexity import load_variant  # benchmarks/, the script's folder

from models.evaluate import evaluation_text, perplexity
from models.registry import DEFAULT_MODEL, load_model, resolve

VARIANTS = {
    "softmax teacher": dict(attention_kernel="softmax"),
    "revision 6 (no sparse cache)": dict(sparse_cache_size=0),
    f"{DEFAULT_MODEL} (sparse cache)": dict(),
}


def main() -> None:
    torch.set_grad_enabled(False)
    path = resolve(DEFAULT_MODEL)
    _, tokenizer = load_model(DEFAULT_MODEL, progress=False)
    ids = torch.tensor(tokenizer(evaluation_text())["input_ids"])
    rows = {}
    for name, overrides in VARIANTS.items():
        model = load_variant(path, overrides)
        rows[name] = [perplexity(model, ids, window=n) for n in (1024, 4096)]
        print(name, rows[name], flush=True)
    teacher = rows["softmax teacher"]
    print("| variant | ppl 1K | ppl 4K | x teacher 1K | x teacher 4K |\n|---|---|---|---|---|")
    for name, (p1, p4) in rows.items():
        print(f"| {name} | {p1:.2f} | {p4:.2f} | {p1 / teacher[0]:.3f} | {p4 / teacher[1]:.3f} |")


if __name__ == "__main__":
    main()
