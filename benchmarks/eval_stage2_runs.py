"""Stage-2 runs of the default model next to its window alone, by position bucket, on the test
text and on validation texts.

    .venv/bin/python benchmarks/eval_stage2_runs.py [--out benchmarks/results]

Test text: GPL-3 (as everywhere in the README). Validation texts, also never trained on:
GFDL-1.3 and LGPL-2.1 from the same Debian package (the first 4,096 tokens of each). The runs'
LLN parameters and training reports are in benchmarks/stage2_runs/ (see its README.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from bench_quality import position_nll  # benchmarks/, the script's folder
from eval_perplexity import load_variant
from safetensors.torch import load_file

from models.evaluate import evaluation_text
from models.registry import DEFAULT_MODEL, REGISTRY, load_model, resolve

RUNS = Path(__file__).parent / "stage2_runs"
VALIDATION_FILES = ("/usr/share/common-licenses/GFDL-1.3", "/usr/share/common-licenses/LGPL-2.1")
WINDOW = 4096
LOCAL = REGISTRY[DEFAULT_MODEL].config["local_size"]
BUCKETS = [(LOCAL, 1024), (1024, 2048), (2048, 4096), (1024, 4096)]
VARIANTS = {
    "window alone (LLN removed)": None,
    "stage 1 + selection (previous default)": "selection",
    "run A (shipped default)": "A",
    **{f"run {name}": name for name in "BCDF"},
}


def first_windows(tokenizer, files: list[str]) -> torch.Tensor:
    """The first 4K tokens of each file, end to end (one scoring window each)."""
    ids = [tokenizer(Path(file).read_text())["input_ids"][:WINDOW] for file in files]
    return torch.tensor([token for part in ids for token in part])


def variant(path: Path, params: str | None):
    if params is None:
        return load_variant(path, dict(mix=float("-inf")))
    model = load_variant(path, {})
    model.load_state_dict(load_file(RUNS / f"{params}.safetensors"), strict=False)
    return model


def table(title: str, rows: dict[str, list[float]]) -> list[str]:
    base = rows["window alone (LLN removed)"]
    names = [f"{lo}-{hi}" for lo, hi in BUCKETS]
    lines = [f"**{title}**", "", "| variant | " + " | ".join(names) + " |"]
    lines.append("|---|" + "---|" * len(BUCKETS))
    for name, ppl in rows.items():
        cells = [f"{p:.3f}" + (" *" if p < q else "") for p, q in zip(ppl, base, strict=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    path = resolve(DEFAULT_MODEL)
    _, tokenizer = load_model(DEFAULT_MODEL, progress=False)
    texts = {
        "test: GPL-3": torch.tensor(tokenizer(evaluation_text())["input_ids"]),
        "validation: GFDL-1.3 + LGPL-2.1": first_windows(tokenizer, list(VALIDATION_FILES)),
    }
    rows = {title: {} for title in texts}
    for name, params in VARIANTS.items():
        model = variant(path, params)
        for title, ids in texts.items():
            rows[title][name] = position_nll(model, ids, WINDOW, BUCKETS)
        print(name, {t: [round(p, 3) for p in r[name]] for t, r in rows.items()}, flush=True)
    lines = ["Perplexity by position bucket (4,096-token windows); * = below the window alone.", ""]
    for title in texts:
        lines += table(title, rows[title])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stage2_runs.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
