"""Stage-2 runs of the default model next to its window alone, by position bucket, on held-out
text split into validation (to choose a run) and test (to report it), with paired bootstrap
confidence intervals over scoring windows.

    .venv/bin/python benchmarks/eval_stage2_runs.py [--out benchmarks/results] [--cache DIR]
        [--variants "window alone,run A,..."]

Scoring windows (4,096 tokens each, every one scored from an empty state), none trained or
calibrated on:
- The Debian Administrator's Handbook (package debian-handbook, fetched with apt-get download
  when not installed): every third 4K-token window of the book, alternately validation / test;
- licences from Debian's base-files: GFDL-1.3 and LGPL-2.1 (validation), GPL-3 (test), the
  first 4,096 tokens of each.
The runs' LLN parameters and training reports are in benchmarks/stage2_runs/ (its README.md).
Per-token NLLs are cached in --cache (keyed by the parameters and the windows' tokens), so a
rerun only scores what changed: about 13 s per window and variant on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from eval_perplexity import NO_SPARSE, load_variant  # benchmarks/, the script's folder
from safetensors.torch import load_file

from models.evaluate import EVALUATION_FILE, handbook_text
from models.registry import DEFAULT_MODEL, REGISTRY, lln_home, load_model, resolve

RUNS = Path(__file__).parent / "stage2_runs"
VALIDATION_FILES = ("/usr/share/common-licenses/GFDL-1.3", "/usr/share/common-licenses/LGPL-2.1")
WINDOW = 4096
HANDBOOK_STRIDE = 3
LOCAL = REGISTRY[DEFAULT_MODEL].config["local_size"]
BUCKETS = [(LOCAL, 1024), (1024, 2048), (2048, 4096), (1024, 4096)]
PAST_WINDOW = BUCKETS[:3]  # disjoint buckets past the window: the bar's "every bucket"
BASELINE = "window alone (LLN removed)"
TEACHER = "softmax teacher"
SPARSE = REGISTRY[DEFAULT_MODEL].config["sparse_cache_size"]
KV_DTYPE = REGISTRY[DEFAULT_MODEL].config.get("kv_cache_dtype", "auto")
# name: LLN parameters to load (None: the LLN part removed; "softmax": the teacher); the runs
# without the sparse cache, as they were chosen; ("sparse", params): with the default's cache
VARIANTS = {
    TEACHER: "softmax",
    BASELINE: None,
    "stage 1 + selection": RUNS / "selection.safetensors",
    "run A (previous default)": RUNS / "A.safetensors",
    "run B (revision 6)": RUNS / "B.safetensors",
    **{f"run {name}": RUNS / f"{name}.safetensors" for name in "CDF"},
    f"run B + sparse cache {SPARSE}, {KV_DTYPE} (revision {REGISTRY[DEFAULT_MODEL].revision}, "
    "shipped)": ("sparse", RUNS / "B.safetensors"),
}
BOOTSTRAP_SAMPLES = 4000


def default_cache() -> Path:
    return lln_home() / "eval_stage2_runs"


def scoring_windows(tokenizer) -> dict[str, dict[str, torch.Tensor]]:
    """{split: {window name: 4K token ids}}."""

    def first_window(file: str) -> torch.Tensor:
        return torch.tensor(tokenizer(Path(file).read_text())["input_ids"][:WINDOW])

    splits = {
        "validation": {Path(file).name: first_window(file) for file in VALIDATION_FILES},
        "test": {Path(EVALUATION_FILE).name: first_window(EVALUATION_FILE)},
    }
    book = torch.tensor(tokenizer(handbook_text())["input_ids"])
    for n, i in enumerate(range(0, book.numel() // WINDOW, HANDBOOK_STRIDE)):
        split = "validation" if n % 2 == 0 else "test"
        splits[split][f"handbook {i}"] = book[i * WINDOW : (i + 1) * WINDOW]
    return splits


def variant(path: Path, params: Path | str | tuple | None):
    if params == "softmax":
        return load_variant(path, dict(attention_kernel="softmax"))
    if params is None:
        return load_variant(path, dict(mix=float("-inf"), **NO_SPARSE))
    sparse = isinstance(params, tuple)
    model = load_variant(path, {} if sparse else dict(NO_SPARSE))
    model.load_state_dict(load_file(params[1] if sparse else params), strict=False)
    return model


@torch.no_grad()
def token_nll(model, ids: torch.Tensor) -> np.ndarray:
    """[len(ids) - 1] next-token NLL of one window scored from an empty state."""
    ids = ids.to(model.device)
    logits, _ = model.forward_states(ids[None])
    nll = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[1:], reduction="none")
    return nll.cpu().numpy()


def variant_nll(
    path: Path, params: Path | str | tuple | None, windows: dict[str, torch.Tensor], cache: Path
) -> dict[str, np.ndarray]:
    """{window name: token NLL}, from the cache when the parameters and tokens are the same."""
    if isinstance(params, tuple):
        key = hashlib.sha256(params[1].read_bytes() + f"sparse {SPARSE} {KV_DTYPE}".encode())
        stem = f"{params[1].stem}-sparse{SPARSE}-{KV_DTYPE}"
    elif isinstance(params, Path):
        key, stem = hashlib.sha256(params.read_bytes()), params.stem
    else:
        stem = params or "window"
        key = hashlib.sha256(stem.encode())
    for name, ids in sorted(windows.items()):
        key.update(name.encode() + ids.numpy().tobytes())
    file = cache / f"{stem}-{key.hexdigest()[:16]}.npz"
    if file.is_file():
        return dict(np.load(file))
    model = variant(path, params)
    nll = {name: token_nll(model, ids) for name, ids in windows.items()}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(file, **nll)
    return nll


def bucket_change(nll: dict, base: dict, lo: int, hi: int) -> tuple[float, ...]:
    """Perplexity ratio to the baseline - 1 over a bucket, pooled over windows, with a 95%
    paired bootstrap interval (windows resampled, fixed seed: every table agrees) and the share
    of windows it improves."""
    diff = np.array([nll[w][lo : hi - 1].mean() - base[w][lo : hi - 1].mean() for w in base])
    samples = np.random.default_rng(0).integers(0, diff.size, size=(BOOTSTRAP_SAMPLES, diff.size))
    low, high = np.percentile(diff[samples].mean(axis=1), [2.5, 97.5])
    return math.expm1(diff.mean()), math.expm1(low), math.expm1(high), float((diff < 0).mean())


def bucket_perplexity(nll: dict, lo: int, hi: int) -> float:
    """Perplexity over positions [lo, hi) of equally long windows."""
    return math.exp(np.mean([values[lo : hi - 1].mean() for values in nll.values()]))


def table(title: str, nll: dict[str, dict]) -> list[str]:
    base = nll[BASELINE]
    names = [f"{lo}-{hi}" for lo, hi in BUCKETS]
    lines = [f"**{title}** ({len(base)} windows of {WINDOW:,} tokens)", ""]
    lines += ["| variant | " + " | ".join(names) + " |", "|---|" + "---|" * len(BUCKETS)]
    for name, values in nll.items():
        cells = []
        for lo, hi in BUCKETS:
            cell = f"{bucket_perplexity(values, lo, hi):.3f}"
            if name not in (BASELINE, TEACHER):
                change, low, high, _ = bucket_change(values, base, lo, hi)
                mark = " *" if high < 0 else ""
                cell += f" ({100 * change:+.2f}% [{100 * low:+.2f}, {100 * high:+.2f}]{mark})"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def worst_change(values: dict, base: dict) -> float:
    """The least improvement over the window alone among the buckets past the window."""
    return max(bucket_change(values, base, lo, hi)[0] for lo, hi in PAST_WINDOW)


def gap_closed(nll: dict[str, dict], name: str, lo: int, hi: int) -> str:
    """How much of the teacher's lead over the window alone the variant wins back."""
    if TEACHER not in nll:
        return ""
    teacher, window, ppl = (bucket_perplexity(nll[n], lo, hi) for n in (TEACHER, BASELINE, name))
    share = (window - ppl) / (window - teacher)
    return f"; {100 * share:.1f}% of the teacher's lead (teacher {teacher:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--variants", help="comma-separated names (default: all)")
    args = parser.parse_args()
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    if BASELINE not in names:
        names.insert(0, BASELINE)
    path = resolve(DEFAULT_MODEL)
    _, tokenizer = load_model(DEFAULT_MODEL, progress=False)
    splits = scoring_windows(tokenizer)
    nll = {split: {} for split in splits}
    for name in names:
        for split, windows in splits.items():
            nll[split][name] = variant_nll(path, VARIANTS[name], windows, args.cache)
        print(name, flush=True)
    validation, test = nll["validation"], nll["test"]
    chosen = min(
        (name for name in names if name not in (BASELINE, TEACHER)),
        key=lambda name: worst_change(validation[name], validation[BASELINE]),
    )
    lines = [
        "Perplexity by position bucket (4,096-token windows); in brackets the change against the"
        " window alone with its 95% paired bootstrap interval over windows; * = the whole"
        " interval below zero.",
        "",
        *table("validation", validation),
        *table("test", test),
        f"Chosen on validation (least bad bucket past the window): {chosen}. On test:",
        "",
    ]
    for lo, hi in BUCKETS:
        change, low, high, wins = bucket_change(test[chosen], test[BASELINE], lo, hi)
        verdict = "the interval below zero" if high < 0 else "the interval includes zero"
        lines.append(
            f"- {lo}-{hi}: {100 * change:+.2f}% [{100 * low:+.2f}, {100 * high:+.2f}] against the"
            f" window alone ({verdict}); better in {100 * wins:.0f}% of windows"
            + gap_closed(test, chosen, lo, hi)
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stage2_runs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
