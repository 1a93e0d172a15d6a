"""Whole-model benchmark of the default model, batch 1: decode latency, prefill throughput and
state memory against context length, LLN kernels next to the same weights in transformers' own
Llama with a KV cache, all in one run.

    .venv/bin/python benchmarks/bench_model.py [--quick] [--gemm-dtype float32] [--out ...]

The LLN models decode through compiled layers (`compile_decode`, the server's path); the
column "lln_diag, eager decode" runs the same steps uncompiled. Decode at context L: the state
(or KV cache) after a real prefill of L tokens, then single-token steps (LLN: in place, as the
server's slot pool runs them) timed round-robin over
all models and contexts (machine noise hits all alike); at 1M, a synthetic LLN state (a real
state relabelled as 1M tokens: the step's cost and the state's size do not depend on its
content). LLN prefill runs in chunks of 4,096 tokens carrying the state, as the engine
prefills (linear in the prompt, bounded activations); transformers' softmax takes the whole
sequence. The floor is one batch-1 pass through the model's linear layers alone, i.e. the cost
of reading the weights. Weights are float32; matmuls over more than 4 rows run in bfloat16 as
the server's CPU default does (`--gemm-dtype`, every model alike, the softmax peer included).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lln_core.state import kv_cache_bytes
from models.modeling_lln import LLNForCausalLM
from models.quantize import Bf16GemmLinear, bf16_gemm_is_fast, use_bf16_gemms
from models.registry import DEFAULT_MODEL, from_checkpoint, resolve

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SYNTHETIC_CONTEXT = 1 << 20
PREFILL_CHUNK = 4096  # LLN prefill goes through the model in chunks of this many tokens


EAGER = "lln_diag, eager decode"
NO_SPARSE = "lln_diag, no sparse cache"
LLN_MODELS = ("lln", "lln_diag", NO_SPARSE)


def load_models(path: Path, bf16_gemms: bool) -> dict[str, torch.nn.Module]:
    """The LLN models decode through compiled layers, as the server does (`compile_decode`)."""
    lln_diag = from_checkpoint(path)
    lln = from_checkpoint(path, attention_kernel="lln")
    no_sparse = from_checkpoint(path, sparse_cache_size=0, kv_cache_dtype="auto")
    for model in (lln_diag, lln, no_sparse):
        model.compile_decode(cpp_wrapper=True)  # as the server on a CPU
    config = LlamaConfig(**{
        k: v for k, v in lln_diag.config.to_dict().items() if k in LlamaConfig().to_dict()
    })  # fmt: skip
    hf = LlamaForCausalLM(config).eval()
    hf.load_state_dict(lln_diag.state_dict(), strict=False)
    for model in (lln_diag, lln, no_sparse, hf) if bf16_gemms else ():
        use_bf16_gemms(model)
    return {"lln": lln, "lln_diag": lln_diag, NO_SPARSE: no_sparse,
            "softmax (transformers, KV cache)": hf}  # fmt: skip


def floor_step(model: LLNForCausalLM) -> Callable[[], None]:
    """One token through every linear layer (q, k, v, o, MLP, lm_head): reading the weights."""
    linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Bf16GemmLinear))]
    inputs = [torch.randn(1, 1, m.in_features) for m in linears]

    def step() -> None:
        for layer, x in zip(linears, inputs, strict=True):
            layer(x)

    return step


def prefill(model, name: str, context: int) -> tuple[float, int, Callable[[], None]]:
    """Prefill `context` tokens (median time of a few runs below 4K tokens, where one run is
    short and noisy); returns the time, the state bytes and a decode step on that state that
    leaves the context at L."""
    runs = [prefill_once(model, name, context) for _ in range(max(1, min(5, 4096 // context)))]
    seconds = statistics.median(run[0] for run in runs)
    return seconds, runs[-1][1], runs[-1][2]


@torch.no_grad()
def prefill_once(model, name: str, context: int) -> tuple[float, int, Callable[[], None]]:
    ids = torch.randint(0, 49152, (1, context), generator=torch.Generator().manual_seed(context))
    token = ids[:, -1:]
    start = time.perf_counter()
    if name.startswith("softmax"):
        cache = model(ids, use_cache=True, logits_to_keep=1).past_key_values
        seconds = time.perf_counter() - start
        state_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)

        def step() -> None:
            model(token, past_key_values=cache, use_cache=True)
            cache.crop(-1)  # drop the new token: the context stays L

        return seconds, state_bytes, step
    states = None
    for first in range(0, context, PREFILL_CHUNK):  # chunked, as the engine prefills
        _, states = model.forward_states(ids[:, first : first + PREFILL_CHUNK], states, None, 1)
    seconds = time.perf_counter() - start
    return seconds, sum(s.nbytes for s in states), lln_step(model, states, token)


def lln_step(model: LLNForCausalLM, states, token) -> Callable[[], None]:
    """A decode step as the server's slot pool runs it: in place, on its own copy of the
    states (the context grows by the few dozen timed steps, nothing at these lengths)."""
    held = [s.clone() for s in states]

    def step() -> None:
        _, held[:] = model.forward_states(token, held, in_place=True)

    step.states, step.token = states, token
    return step


@torch.no_grad()
def interleaved_rounds(steps: dict, rounds: int, per_round: int = 4) -> dict:
    """Each step function's median time in each round, measured round-robin so that machine
    noise hits all of them alike: {key: [median of round 1, ...]}."""
    times: dict = {key: [] for key in steps}
    for fn in steps.values():
        fn()  # warm-up
    for _ in range(rounds):
        for key, fn in steps.items():
            samples = []
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            times[key].append(statistics.median(samples))
    return times


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a's time over b's, both measured back to back in each round: a
    slow spell of the machine that hits one round hits both."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def synthetic_states(states, num_tokens: int = SYNTHETIC_CONTEXT):
    """The same states relabelled as num_tokens long (positions shifted by a multiple of the
    ring size, so every slot keeps its meaning)."""
    out = []
    for s in states:
        s = s.clone()
        if not hasattr(s, "num_tokens"):  # the sparse cache's scores: nothing to relabel
            out.append(s)
            continue
        shift = num_tokens - int(s.num_tokens.max())
        s.num_tokens.fill_(num_tokens)
        if getattr(s, "local", None) is not None:
            s.local.pos.add_(num_tokens - int(s.local.pos.max()) - 1).clamp_(min=-1)
            s.local.pos[:, : s.local.num_sinks] = torch.arange(s.local.num_sinks)
        if getattr(s, "sparse", None) is not None:
            s.sparse.pos.copy_(torch.where(s.sparse.pos >= 0, s.sparse.pos + shift, -1))
        out.append(s)
    return out


def run(contexts: list[int], softmax_max: int, rounds: int, bf16_gemms: bool) -> tuple[dict, float]:
    models = load_models(resolve(DEFAULT_MODEL), bf16_gemms)
    results: dict[str, dict[int, dict]] = {name: {} for name in models}
    steps: dict = {"floor": floor_step(models["lln_diag"])}
    for context in contexts:
        for name, model in models.items():
            if name.startswith("softmax") and context > softmax_max:
                continue
            if context == contexts[0]:
                prefill(model, name, 64)  # warm-up: first-call costs are not prefill
            seconds, state_bytes, steps[name, context] = prefill(model, name, context)
            results[name][context] = {"prefill": seconds, "bytes": state_bytes}
            print(f"{name:34s} L={context:>7,}: prefill {context / seconds:7.1f} tok/s", flush=True)
    eager = from_checkpoint(resolve(DEFAULT_MODEL))  # same weights, decode left eager
    if bf16_gemms:
        use_bf16_gemms(eager)
    results[EAGER] = {}
    for context in contexts:
        diag_step = steps["lln_diag", context]
        steps[EAGER, context] = lln_step(eager, diag_step.states, diag_step.token)
        results[EAGER][context] = {"prefill": None, "bytes": results["lln_diag"][context]["bytes"]}
    token = torch.zeros(1, 1, dtype=torch.long)
    for name in LLN_MODELS:
        model = models[name]
        with torch.no_grad():
            _, states = model.forward_states(token.repeat(1, contexts[0]), logits_to_keep=1)
        steps[name, SYNTHETIC_CONTEXT] = lln_step(model, synthetic_states(states), token)
        results[name][SYNTHETIC_CONTEXT] = {"prefill": None, "bytes": sum(s.nbytes for s in states)}
    print("decode: interleaved rounds ...", flush=True)
    times = interleaved_rounds(steps, rounds)
    for key, per_round in times.items():
        if key != "floor":
            name, context = key
            results[name][context]["decode"] = statistics.median(per_round)
            results[name][context]["rounds"] = per_round
    return results, statistics.median(times["floor"])


def report(results: dict, floor: float, contexts: list[int], out: Path, gemm: str) -> str:
    names = list(results)
    others = [n for n in names if n != EAGER]  # the eager variant has decode columns only
    all_contexts = [*contexts, SYNTHETIC_CONTEXT]
    lines = [
        f"# Default model ({DEFAULT_MODEL}), batch 1, float32 weights, {gemm} GEMMs, CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}",
        "",
        f"`.venv/bin/python benchmarks/bench_model.py --gemm-dtype {gemm}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} UTC. "
        f"Floor (one token through the linear layers alone): {floor * 1e3:.1f} ms.",
        "",
        "| context | " + " | ".join(f"{n}: decode ms (x floor)" for n in names) + " | "
        + " | ".join(f"{n}: prefill tok/s" for n in others) + " | "
        + " | ".join(f"{n}: state MiB" for n in others) + " |",
        "|---" * (1 + len(names) + 2 * len(others)) + "|",
    ]  # fmt: skip
    for context in all_contexts:
        cells = []
        for n in names:
            r = results[n].get(context)
            cells.append(
                "" if r is None else f"{r['decode'] * 1e3:.1f} ({r['decode'] / floor:.2f})"
            )
        for n in others:
            r = results[n].get(context)
            ok = r is not None and r["prefill"] is not None
            cells.append(f"{context / r['prefill']:.0f}" if ok else "")
        for n in others:
            r = results[n].get(context)
            cells.append("" if r is None else f"{r['bytes'] / 2**20:,.2f}")
        label = f"{context:,}" + (" (synthetic)" if context == SYNTHETIC_CONTEXT else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    kv_1m = kv_cache_bytes(SYNTHETIC_CONTEXT, 30, 3, 64, bytes_per_elem=4)
    lines += ["", f"A float32 KV cache at 1M tokens would hold {kv_1m / 2**30:.1f} GiB.", ""]
    lines += goals(results, floor, contexts)
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_model.md").write_text(text)
    plot(results, floor, out / "bench_model.png")
    return text


def goals(results: dict, floor: float, contexts: list[int]) -> list[str]:
    first, longest = min(contexts), max(contexts)
    lines = ["Goals:"]
    for name in LLN_MODELS:
        r = results[name]
        flat = r[longest]["decode"] / r[first]["decode"]
        flat_1m = r[SYNTHETIC_CONTEXT]["decode"] / r[first]["decode"]
        worst_floor = max(x["decode"] for x in r.values()) / floor
        min_prefill = min(c / r[c]["prefill"] for c in contexts)
        lines.append(
            f"- {name}: decode {longest:,} / {first:,} = {flat:.2f}, 1M / {first:,} = "
            f"{flat_1m:.2f} (goal <= 1.1); worst decode / floor = {worst_floor:.2f} (goal <= 1.5); "
            f"slowest prefill {min_prefill:.0f} tok/s (goal >= 350)"
        )
    with_cache, without = results["lln_diag"], results[NO_SPARSE]
    # with and without the cache run back to back in each round (steps in context order)
    ratios = [paired_ratio(with_cache[c]["rounds"], without[c]["rounds"]) for c in without]
    slowest = min(c / with_cache[c]["prefill"] for c in contexts)
    lines.append(
        f"- sparse cache: decode with / without (median of per-round ratios) "
        f"{' / '.join(f'{r:.2f}' for r in ratios)} at {', '.join(f'{c:,}' for c in without)} "
        f"({min(ratios):.2f}-{max(ratios):.2f} over "
        f"{first:,}..1M; goal <= 1.2); slowest prefill with it {slowest:.0f} tok/s (goal >= 300)"
    )
    return lines


def plot(results: dict, floor: float, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, by_context in results.items():
        contexts = sorted(by_context)
        axes[0].plot(contexts, [by_context[c]["decode"] * 1e3 for c in contexts], "o-", label=name)
        with_prefill = [c for c in contexts if by_context[c]["prefill"] is not None]
        axes[1].plot(
            with_prefill, [c / by_context[c]["prefill"] for c in with_prefill], "o-", label=name
        )
        if name != EAGER:
            sizes = [by_context[c]["bytes"] / 2**20 for c in contexts]
            axes[2].plot(contexts, sizes, "o-", label=name)
    axes[0].axhline(floor * 1e3, color="gray", ls=":", label="floor (linear layers)")
    titles = ("decode latency per token", "prefill throughput", "state / KV cache per sequence")
    ylabels = ("ms / token", "tokens / s", "MiB")
    for ax, title, ylabel in zip(axes, titles, ylabels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[2].set_yscale("log")
    fig.suptitle(f"{DEFAULT_MODEL} vs softmax, batch 1, CPU float32 (1M decode: synthetic state)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small contexts, smoke test")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--rounds", type=int, default=16, help="decode: rounds of 4 steps each")
    parser.add_argument("--gemm-dtype", choices=["float32", "bfloat16"],
                        default="bfloat16" if bf16_gemm_is_fast() else "float32",
                        help="matmuls over more than 4 rows (default: the server's)")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        contexts, softmax_max, rounds = [256, 1024], 1024, 2
    else:
        contexts, softmax_max, rounds = [256, 1024, 4096, 16384, 32768], 16384, args.rounds
    results, floor = run(contexts, softmax_max, rounds, args.gemm_dtype == "bfloat16")
    print(report(results, floor, contexts, args.out, args.gemm_dtype))


if __name__ == "__main__":
    main()
