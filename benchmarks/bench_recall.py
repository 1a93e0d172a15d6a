"""Needle retrieval beyond the window: a five-digit code stated once, >= 600 tokens before a
question that asks for it, in held-out text, greedy; one needle or three per context.

    .venv/bin/python benchmarks/bench_recall.py --lengths 1024 2048 4096 --trials 10

Variants side by side in one run: the softmax teacher (full KV cache), the window alone (LLN
removed), the default without the sparse cache (revision 6's kernel) and with it (and with
its LLN part removed: what the LLN state costs or gives recall), revision 8 (far keys at the
positions where they were written), and far-tier sweeps named `fixed-D` (every far key at
rotary distance D), `fixed-D-sS` (the sinks at S), `...-nolln` (LLN part removed),
`grouped-G-M` (the cache's pairs at grouped distances) and `peer-grouped-G-M` (the teacher's
full KV cache read at those distances: an LM-Infinite-style peer). Filler is
The Debian Administrator's Handbook (never trained or calibrated on), taken at a different
offset for every trial; statement and question wordings rotate. An answer counts when the first
five-digit number the model writes is the code. Writes benchmarks/results/bench_recall.md.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from pathlib import Path

import torch
from eval_perplexity import load_variant  # benchmarks/, the script's folder

from lln_core.state import kv_cache_bytes
from models.evaluate import handbook_text
from models.registry import DEFAULT_MODEL, REGISTRY, resolve

# (statement, question): {x} is the subject, {code} the code.
WORDINGS = [
    (" The access code for the {x} server room is {code}. ",
     " What is the access code for the {x} server room? The access code is"),
    (" Remember this: the secret number of {x} is {code}. ",
     " What is the secret number of {x}? The secret number of {x} is"),
    (" Note that {x}'s locker combination is {code}. ",
     " What is {x}'s locker combination? {x}'s locker combination is"),
    (" The parcel for {x} was shipped with tracking number {code}. ",
     " Which tracking number was the parcel for {x} shipped with? The tracking number is"),
]  # fmt: skip
SUBJECTS = ["Marlow", "Quentin", "Oslo", "Priya", "Tbilisi", "Helga", "Lagos", "Ignatius"]
MIN_DISTANCE = 600  # tokens between the end of the needle and the question
SPARSE = REGISTRY[DEFAULT_MODEL].config["sparse_cache_size"]
KV_DTYPE = REGISTRY[DEFAULT_MODEL].config.get("kv_cache_dtype", "auto")


def needle_prompt(tokenizer, filler: list[int], rng: random.Random, length: int, needles: int):
    """Token ids of one context with `needles` facts, per fact (question ids, code), and the
    positions of the statements' tokens."""
    facts = []
    for i, subject in enumerate(rng.sample(SUBJECTS, needles)):
        statement, question = WORDINGS[(rng.randrange(len(WORDINGS)) + i) % len(WORDINGS)]
        code = rng.randrange(10_000, 100_000)
        facts.append((
            tokenizer(statement.format(x=subject, code=code), add_special_tokens=False).input_ids,
            tokenizer(question.format(x=subject), add_special_tokens=False).input_ids,
            code,
        ))  # fmt: skip
    longest_question = max(len(q) for _, q, _ in facts)
    body_len = length - sum(len(s) for s, _, _ in facts) - longest_question
    start = rng.randrange(0, len(filler) - body_len)
    body = filler[start : start + body_len]
    latest = body_len - MIN_DISTANCE
    depths = sorted(rng.randrange(0, latest) for _ in facts)
    ids, last, needle_positions = [], 0, []
    for depth, (statement, _, _) in zip(depths, facts, strict=True):
        ids += body[last:depth]
        needle_positions += range(len(ids), len(ids) + len(statement))
        ids += statement
        last = depth
    ids += body[last:]
    return ids, [(question, code) for _, question, code in facts], needle_positions


@torch.no_grad()
def answer(model, states, question: list[int], max_tokens: int = 8):
    """Greedy continuation of a prefilled context (its states are copied, not changed)."""
    states = [s.clone() for s in states]
    logits, states = model.forward_states(torch.tensor([question]), states, logits_to_keep=1)
    out = []
    for _ in range(max_tokens):
        token = int(logits[0, -1].argmax())
        out.append(token)
        logits, states = model.forward_states(torch.tensor([[token]]), states)
    return out


def found(tokenizer, ids: list[int], code: int) -> bool:
    digits = re.findall(r"\d{5,}", tokenizer.decode(ids).replace(" ", ""))
    return bool(digits) and digits[0] == str(code)


@torch.no_grad()
def recall(model, tokenizer, filler, length: int, trials: int, needles: int, seed: int):
    """(hits, questions, seconds spent prefilling the contexts, the fraction of the
    statements' tokens in the sparse cache or the window when the questions come: None
    without a sparse cache)."""
    rng = random.Random(f"{seed}-{length}-{needles}")
    hits = total = kept = needle_tokens = 0
    prefill = 0.0
    for _ in range(trials):
        context, questions, needle_positions = needle_prompt(
            tokenizer, filler, rng, length, needles
        )
        began = time.perf_counter()
        _, states = model.forward_states(torch.tensor([context]), logits_to_keep=1)
        prefill += time.perf_counter() - began
        held = held_exactly(states, needle_positions, len(context))
        kept += held
        needle_tokens += len(needle_positions)
        answers = [found(tokenizer, answer(model, states, question), code)
                   for question, code in questions]  # fmt: skip
        hits += sum(answers)
        total += len(answers)
        print(f"  trial: {sum(answers)}/{len(answers)} found, {held}/{len(needle_positions)} "
              "statement tokens held", flush=True)  # fmt: skip
    share = kept / needle_tokens if getattr(states[0], "sparse", None) else None
    return hits, total, prefill, share


def held_exactly(states, positions: list[int], length: int) -> int:
    """How many of `positions` the sparse cache or the window holds exactly after `length`
    tokens (0 for a model without a sparse cache)."""
    sparse = getattr(states[0], "sparse", None)
    if sparse is None:
        return 0
    window = states[0].local.ring_size
    cached = set(sparse.pos[0].tolist())
    return sum(p in cached or p >= length - window for p in positions)


def far_variant(key: str, sparse: dict, longest: int = 0) -> tuple[str, dict] | None:
    """`fixed-D[-sS][-nolln]`: the default with every far key at rotary distance D (the sinks
    at S), its LLN part removed with -nolln; `grouped-G-M`: the sparse cache's pairs at grouped
    distances (G tokens a position, doubled to stay within M); `peer-grouped-G-M`: the same
    positions over every pair (a cache of `longest` pairs never evicts, LLN removed: the
    teacher's full KV cache with Self-Extend's far positions); None for other names."""
    grouped = re.fullmatch(r"(peer-)?grouped-(\d+)-(\d+)", key)
    if grouped is not None:
        peer, group, ceiling = grouped.group(1), int(grouped.group(2)), int(grouped.group(3))
        overrides = {**sparse, "far_positions": "grouped", "far_group": group,
                     "far_max_distance": ceiling}  # fmt: skip
        if peer:  # every pair past the window kept exact, no LLN: the teacher's full KV cache
            overrides.update(sparse_cache_size=longest, mix=float("-inf"))
            return (f"softmax teacher, far keys at grouped distances (g={group}, within "
                    f"{ceiling}; full KV cache)", overrides)  # fmt: skip
        return f"sparse cache at grouped distances (g={group}, within {ceiling})", overrides
    match = re.fullmatch(r"fixed-(\d+)(?:-s(\d+))?(-nolln)?", key)
    if match is None:
        return None
    distance, sinks, no_lln = match.groups()
    overrides = {**sparse, "far_positions": "fixed", "far_distance": int(distance),
                 "far_sink_distance": int(sinks) if sinks else None}  # fmt: skip
    name = f"far keys at distance {distance}" + (f", sinks at {sinks}" if sinks else "")
    if no_lln:
        overrides["mix"] = float("-inf")
        name += ", LLN removed"
    return name, overrides


def state_bytes(model, length: int) -> int:
    config = model.config
    if config.attention_kernel == "softmax":  # the KV cache at this length, float32
        shape = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
        return kv_cache_bytes(length, *shape, bytes_per_elem=4)
    return sum(s.nbytes for s in model.empty_states(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--three-needles", type=int, default=0, help="trials with 3 needles")
    parser.add_argument("--sparse-cache", type=int, default=SPARSE, help="G of the new variant")
    parser.add_argument("--kv-cache-dtype", default=KV_DTYPE, choices=["auto", "bfloat16"],
                        help="storage of the new variant's window and cache")  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=["teacher", "rev8", "sparse"],
                        help="names below, fixed-D[-sS][-nolln] or grouped-G-M")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_recall.md"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    path = resolve(DEFAULT_MODEL)
    sparse = dict(sparse_cache_size=args.sparse_cache, kv_cache_dtype=args.kv_cache_dtype)
    kv = ", bfloat16" if args.kv_cache_dtype == "bfloat16" else ""
    variants = {
        "teacher": ("softmax teacher (full KV cache)", dict(attention_kernel="softmax")),
        "window": ("window 448 + 4 sinks only",
                   dict(mix=float("-inf"), sparse_cache_size=0, kv_cache_dtype="auto")),
        "default": ("LLN+Diag, no sparse cache (revision 6)",
                    dict(sparse_cache_size=0, kv_cache_dtype="auto")),
        "sparse": (f"LLN+Diag + sparse cache G={args.sparse_cache}{kv}", sparse),
        "sparse-int8": (f"LLN+Diag + sparse cache G={args.sparse_cache}{kv}, int8 weights",
                        {**sparse, "int8": True}),
        "sparse-bf16gemm": (f"LLN+Diag + sparse cache G={args.sparse_cache}{kv}, float32 "
                            "weights, bfloat16 GEMMs", {**sparse, "bf16_gemms": True}),
        "sparse-no-lln": (f"window + sparse cache G={args.sparse_cache}{kv}, LLN removed",
                          {**sparse, "mix": float("-inf")}),
        "rev8": ("revision 8 (far keys at their written positions)",
                 {**sparse, "far_positions": "original"}),
    }  # fmt: skip
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    filler = tokenizer(handbook_text(), add_special_tokens=False).input_ids
    rows, speeds = [], []
    for key in args.variants:
        name, overrides = far_variant(key, sparse, max(args.lengths)) or variants[key]
        model = load_variant(path, overrides)
        cells, speed = [], []
        for length in args.lengths:
            began = time.perf_counter()
            hits, total, prefill, share = recall(model, tokenizer, filler, length, args.trials,
                                                 1, args.seed)  # fmt: skip
            held = "" if share is None else f" ({share:.0%} held)"
            cells.append(f"{hits}/{total}{held}")
            speed.append(f"{length * args.trials / prefill:.0f}")
            print(f"{name} {length}: {cells[-1]} ({time.perf_counter() - began:.0f} s, "
                  f"prefill {speed[-1]} tok/s)", flush=True)  # fmt: skip
        if args.three_needles:
            hits, total, _, _ = recall(model, tokenizer, filler, args.lengths[-1],
                                       args.three_needles, 3, args.seed)  # fmt: skip
            cells.append(f"{hits}/{total}")
            print(f"{name} 3 needles {args.lengths[-1]}: {hits}/{total}", flush=True)
        size = state_bytes(model, args.lengths[-1]) / 2**20
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {size:.2f} |")
        speeds.append(f"| {name} | " + " | ".join(speed) + " |")
    header = [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in args.lengths]
    lengths_header = list(header)
    if args.three_needles:
        header.append(f"3 needles at {header[-1]}")
    table = "\n".join([
        "| variant | " + " | ".join(header) + " | state MiB (KV cache at the longest) |",
        "|---|" + "---|" * (len(header) + 1),
        *rows,
        "",
        "(N% held: the share of the statements' tokens in the sparse cache or the window when "
        "the question comes.)",
        "",
        "Prefill tokens/s of the contexts (one sequence, float32, this run's machine):",
        "",
        "| variant | " + " | ".join(lengths_header) + " |",
        "|---|" + "---|" * len(lengths_header),
        *speeds,
    ])  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "benchmarks/bench_recall.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items() if k != "out"
    )  # fmt: skip
    args.out.write_text(f"# Needle retrieval beyond the window\n\n`{command}`\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
