"""Quality of the default model's variants next to the softmax teacher, where it matters for
long context: perplexity at 1K and 4K and by token position, passkey retrieval, state bytes,
chat samples, and the issue's bars checked on the numbers.

    .venv/bin/python benchmarks/bench_quality.py [--quick] [--out benchmarks/results]

- Perplexity over 1K- and 4K-token windows, and by position bucket within 4K-token windows, of
  held-out text (GPL-3, Debian base-files; never trained or calibrated on): a constant-size
  state earns its keep if the buckets past the local window beat the local window alone.
- Passkey retrieval: a five-digit number stated once at the start of filler text of about
  1K / 4K tokens, asked for at the end; greedy answer checked, over several keys and depths.
- Chat samples: greedy answers to a few chat prompts, side by side.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from eval_perplexity import NO_SPARSE, load_variant  # benchmarks/, the script's folder
from eval_stage2_runs import (
    PAST_WINDOW,
    bucket_change,
    bucket_perplexity,
    default_cache,
    scoring_windows,
    token_nll,
    variant_nll,
)

from lln_core.state import kv_cache_bytes
from models.evaluate import evaluation_text, perplexity
from models.registry import DEFAULT_MODEL, REGISTRY, WEIGHTS, load_model, resolve

_LOCAL = REGISTRY[DEFAULT_MODEL].config
WINDOW = f"window {_LOCAL['local_size']} + {_LOCAL['num_sinks']} sinks"
TEACHER, LOCAL_ONLY, DEFAULT = "softmax teacher", f"{WINDOW} only (LLN removed)", DEFAULT_MODEL
VARIANTS = {
    TEACHER: dict(attention_kernel="softmax"),
    LOCAL_ONLY: dict(mix=float("-inf"), **NO_SPARSE),
    f"{WINDOW} + LLN, calibrated (before distillation)": dict(calibrated=True, **NO_SPARSE),
    f"{WINDOW} + LLN, no sparse cache (revision 6)": dict(NO_SPARSE),
    DEFAULT: dict(),
}
BUCKETS = [(0, 256), (256, 1024), (1024, 4096), (1024, 2048), (2048, 4096)]
STATE_BAR = 32 * 2**20
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
CHATS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "Give me three colours.",
]


@torch.no_grad()
def position_nll(
    model, ids: torch.Tensor, window: int = 4096, buckets: list[tuple[int, int]] = BUCKETS
) -> list[float]:
    """Perplexity per bucket of positions, over non-overlapping windows."""
    starts = range(0, ids.numel() - window + 1, window)
    nll = {start: token_nll(model, ids[start : start + window]) for start in starts}
    return [bucket_perplexity(nll, lo, hi) for lo, hi in buckets]


@torch.no_grad()
def greedy(model, ids: list[int], max_tokens: int, stop: int | None = None) -> list[int]:
    """Greedy continuation, up to max_tokens or the `stop` token (not included)."""
    logits, states = model.forward_states(torch.tensor([ids]), logits_to_keep=1)
    out = []
    for _ in range(max_tokens):
        token = int(logits[0, -1].argmax())
        if token == stop:
            break
        out.append(token)
        logits, states = model.forward_states(torch.tensor([[token]]), states)
    return out


def passkey_prompt(tokenizer, key: int, length: int, depth: float) -> list[int]:
    filler = tokenizer(FILLER, add_special_tokens=False).input_ids
    needle = tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key. ",
                       add_special_tokens=False).input_ids  # fmt: skip
    question = tokenizer(
        " What is the pass key? The pass key is", add_special_tokens=False
    ).input_ids
    body_len = length - len(needle) - len(question)
    body = (filler * (body_len // len(filler) + 1))[:body_len]
    at = int(depth * body_len)
    return body[:at] + needle + body[at:] + question


def passkey_accuracy(model, tokenizer, length: int, trials: int) -> float:
    rng = random.Random(length)
    hits = 0
    for t in range(trials):
        key = rng.randrange(10_000, 100_000)
        depth = t / max(trials - 1, 1) * 0.9
        answer = tokenizer.decode(greedy(model, passkey_prompt(tokenizer, key, length, depth), 6))
        hits += str(key) in answer
    return hits / trials


def chat_samples(model, tokenizer, max_tokens: int) -> list[str]:
    answers = []
    for question in CHATS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        answer = greedy(model, list(ids), max_tokens, stop=tokenizer.eos_token_id)
        text = tokenizer.decode(answer, skip_special_tokens=True)
        answers.append(" ".join(text.split()))
    return answers


def state_size(model) -> int:
    """Bytes one sequence holds: the constant state, or the softmax KV cache at 4K tokens."""
    config = model.config
    if config.attention_kernel == "softmax":
        shape = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
        return kv_cache_bytes(4096, *shape, bytes_per_elem=4)
    return sum(s.nbytes for s in model.empty_states(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials, shorter samples")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    trials, chat_tokens = (2, 12) if args.quick else (5, 40)
    path = resolve(DEFAULT_MODEL)
    _, tokenizer = load_model(DEFAULT_MODEL, progress=False)
    ids = torch.tensor(tokenizer(evaluation_text())["input_ids"])
    rows, chats = {}, {}
    for name, overrides in VARIANTS.items():
        model = load_variant(path, overrides)
        ppl = [perplexity(model, ids, window=n) for n in (1024, 4096)]
        buckets = position_nll(model, ids)
        keys = [passkey_accuracy(model, tokenizer, n, trials) for n in (1024, 4096)]
        chats[name] = chat_samples(model, tokenizer, chat_tokens)
        rows[name] = (ppl, buckets, keys, state_size(model))
        print(name, rows[name], flush=True)
    heldout = heldout_checks(path, tokenizer)
    print(report(rows, chats, heldout, trials, ids.numel(), args.out))


def heldout_checks(path: Path, tokenizer) -> list[tuple[str, bool]]:
    """The shipped default against its local branch alone, by bucket past the window, on the
    held-out test windows (NLLs cached where eval_stage2_runs.py keeps them)."""
    windows = scoring_windows(tokenizer)["test"]
    params = WEIGHTS / REGISTRY[DEFAULT].params
    local = variant_nll(path, None, windows, default_cache())
    previous = variant_nll(path, params, windows, default_cache())  # revision 6: no cache
    shipped = variant_nll(path, ("sparse", params), windows, default_cache())
    checks = []
    for lo, hi in PAST_WINDOW:
        for base, name in ((local, "the local branch alone"), (previous, "revision 6")):
            change, low, high, wins = bucket_change(shipped, base, lo, hi)
            text = (
                f"bucket {lo}-{hi} against {name} on {len(windows)} held-out test windows: "
                f"{100 * change:+.2f}% (95% interval {100 * low:+.2f} to {100 * high:+.2f}), "
                f"better in {100 * wins:.0f}% of windows"
            )
            checks.append((text, change < 0 if base is local else low <= 0))
    return checks


def bars(rows: dict, heldout: list[tuple[str, bool]]) -> list[str]:
    """The issue's bars for the shipped default, checked on this run's numbers."""
    (ppl, _, _, state), (ppl_t, _, _, _) = rows[DEFAULT], rows[TEACHER]
    checks = [
        (f"perplexity at 1K <= 1.15x the teacher's: {ppl[0] / ppl_t[0]:.3f}x",
         ppl[0] <= 1.15 * ppl_t[0]),
        (f"perplexity at 4K <= 1.3x the teacher's: {ppl[1] / ppl_t[1]:.3f}x",
         ppl[1] <= 1.3 * ppl_t[1]),
        *heldout,
        (f"state <= 32 MiB per sequence: {state / 2**20:.2f} MiB", state <= STATE_BAR),
    ]  # fmt: skip
    return [f"- {'met' if ok else 'NOT met'}: {text}" for text, ok in checks]


def report(rows: dict, chats, heldout, trials: int, num_tokens: int, out: Path) -> str:
    bucket_names = [f"{lo}-{hi}" for lo, hi in BUCKETS]
    lines = [
        f"# Quality of {DEFAULT_MODEL} variants",
        "",
        f"`.venv/bin/python benchmarks/bench_quality.py` on {time.strftime('%Y-%m-%d %H:%M')} UTC, "
        f"float32, CPU. Held-out text: GPL-3 ({num_tokens:,} tokens). Perplexity over "
        "non-overlapping 1K- and 4K-token windows, and by token position within 4K-token "
        f"windows; passkey: {trials} keys at depths 0..90%, greedy; state bytes per sequence "
        "(softmax: its float32 KV cache at 4K tokens; LLN variants: at any length).",
        "",
        "| variant | ppl 1K | ppl 4K | " + " | ".join(f"ppl {b}" for b in bucket_names)
        + " | passkey 1K | passkey 4K | state |",
        "|---|" + "---|" * (len(BUCKETS) + 5),
    ]  # fmt: skip
    for name, (ppl, buckets, keys, state_bytes) in rows.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{p:.2f}" for p in (*ppl, *buckets))
            + f" | {keys[0]:.0%} | {keys[1]:.0%} | {state_bytes / 2**20:.2f} MiB |"
        )  # fmt: skip
    lines += ["", f"Bars for {DEFAULT_MODEL}:", "", *bars(rows, heldout)]
    lines += ["", "Chat samples (greedy):", ""]
    for i, question in enumerate(CHATS):
        lines.append(f"**{question}**")
        lines.append("")
        for name, answers in chats.items():
            lines.append(f"- {name}: {answers[i]}")
        lines.append("")
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_quality.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
