"""Kernel benchmark for one attention layer shaped like the default model's (SmolLM2-135M).

Three sections, each printed as markdown tables and drawn as a PNG:

1. decode step time against context length (LLN, LLN+Diag, EA: constant state; softmax: KV cache);
2. prefill time against prompt length (chunked LLN, LLN+Diag, fused causal softmax);
3. state bytes per sequence for the whole model (computed, not timed).

Usage: .venv/bin/python benchmarks/bench_ops.py [--quick] [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from matplotlib.ticker import FuncFormatter, NullFormatter
from torch import Tensor

from lln_core.moments import moment_match
from lln_core.ops.ea import ea_attention, ea_step
from lln_core.ops.lln import lln_attention, lln_step
from lln_core.ops.lln_diag import empty_lln_diag_state, lln_diag_attention, lln_diag_step
from lln_core.ops.softmax import LocalSpec
from lln_core.state import EAState, LLNState, LocalKV, kv_cache_bytes

# SmolLM2-135M attention: 9 query heads over 3 KV heads of dim 64, 30 layers.
NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_LAYERS = 9, 3, 64, 30
# Moment-matched for unit-variance q and k at d = 64 (DESIGN.md section 2): about 2.13 each.
ALPHA, BETA = moment_match(1.0, 1.0, HEAD_DIM)
MIX = 0.0  # log-weight of the LLN part in the joint normalisation of LLN+Diag
LOCAL = LocalSpec("window", 64, num_sinks=4)
PIECE = 65536  # tokens generated and prefilled at once while building decode states
K, M = 1024, 1024 * 1024


@dataclass(frozen=True)
class Config:
    device: torch.device
    dtype: torch.dtype
    contexts: tuple[int, ...]
    prefill_lengths: tuple[int, ...]
    chunk_sizes: tuple[int, ...]
    decode_steps: int  # steps per (method, context), split over interleaved rounds
    decode_rounds: int
    softmax_budget_s: float  # time spent per (softmax variant, context) in decode
    build_budget_s: float  # prefill time per method for building decode states
    prefill_reps: int
    prefill_cell_budget_s: float  # no repetition once a (method, T) cell has taken this long


def make_config(args: argparse.Namespace) -> Config:
    device = torch.device(args.device)
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    if args.quick:
        return Config(
            device=device,
            dtype=dtype,
            contexts=(K, 4 * K, 16 * K, 64 * K),
            prefill_lengths=(K, 2 * K, 4 * K, 8 * K),
            chunk_sizes=(64, 128),
            decode_steps=60,
            decode_rounds=3,
            softmax_budget_s=1.0,
            build_budget_s=10.0,
            prefill_reps=2,
            prefill_cell_budget_s=2.0,
        )
    return Config(
        device=device,
        dtype=dtype,
        contexts=(K, 4 * K, 16 * K, 64 * K, 256 * K, M),
        prefill_lengths=(256, 512, K, 2 * K, 4 * K, 8 * K, 16 * K, 32 * K, 64 * K),
        chunk_sizes=(64, 128, 256),
        decode_steps=200,
        decode_rounds=10,
        softmax_budget_s=8.0,
        build_budget_s=90.0,
        prefill_reps=5,
        prefill_cell_budget_s=10.0,
    )


# ----------------------------------------------------------------------------- timing helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of fn takes, the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def random_qkv(num_tokens: int, cfg: Config, gen: torch.Generator) -> tuple[Tensor, ...]:
    """q [1, Hq, T, D], k and v [1, Hkv, T, D], standard normal, in cfg's device and dtype."""
    shapes = [(1, NUM_Q_HEADS, num_tokens, HEAD_DIM)] + [
        (1, NUM_KV_HEADS, num_tokens, HEAD_DIM)
    ] * 2
    return tuple(torch.randn(s, generator=gen).to(cfg.device, cfg.dtype) for s in shapes)


def fmt_time(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def fmt_len(n: int) -> str:
    if n < K:
        return str(n)
    return f"{n // M}M" if n >= M else f"{n // K}K"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_si_bytes(n: float) -> str:
    """Decimal units, for axis ticks at powers of ten."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n:g} B"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ----------------------------------------------------------------------------- decode states


@dataclass(frozen=True)
class Method:
    """A constant-state attention: prefill (q, k, v, state) -> state, and its decode step."""

    name: str
    prefill: Callable[[Tensor, Tensor, Tensor, Any], Any]
    step: Callable[[Tensor, Tensor, Tensor, Any], Any]
    synthesize: Callable[[Any, int, int], Any]  # (last real state, its length, target length)


def _scaled_lln(state: LLNState, real_len: int, length: int) -> LLNState:
    """S~ and z~ grow about linearly with the keys seen; m stays a running max."""
    ratio = length / real_len
    num_tokens = torch.full_like(state.num_tokens, length)
    return LLNState(state.S * ratio, state.z * ratio, state.m, num_tokens, local=state.local)


def _shifted_local(local: LocalKV, delta: int) -> LocalKV:
    """Ring positions moved by delta (a multiple of the ring size, so every slot stays valid)."""
    pos = torch.where(local.pos >= local.num_sinks, local.pos + delta, local.pos)
    return LocalKV(local.k, local.v, pos, local.num_sinks)


def _synth_diag(state: LLNState, real_len: int, length: int) -> LLNState:
    scaled = _scaled_lln(state, real_len, length)
    scaled.local = _shifted_local(state.local, length - real_len)
    return scaled


def _synth_ea(state: EAState, real_len: int, length: int) -> EAState:
    ratio = length / real_len
    return EAState(state.S * ratio, state.z * ratio, torch.full_like(state.num_tokens, length))


def _lln_prefill(q: Tensor, k: Tensor, v: Tensor, state: Any) -> LLNState:
    return lln_attention(q, k, v, ALPHA, BETA, state=state, chunk_size=64)[1]


def _diag_prefill(q: Tensor, k: Tensor, v: Tensor, state: Any) -> LLNState:
    if state is None:
        state = empty_lln_diag_state(1, NUM_KV_HEADS, HEAD_DIM, LOCAL, device=q.device)
    return lln_diag_attention(q, k, v, ALPHA, BETA, MIX, local=LOCAL, state=state)[1]


def _ea_prefill(q: Tensor, k: Tensor, v: Tensor, state: Any) -> EAState:
    return ea_attention(q, k, v, state=state)[1]


METHODS = (
    Method(
        "LLN",
        _lln_prefill,
        lambda q, k, v, s: lln_step(q, k, v, ALPHA, BETA, s),
        _scaled_lln,
    ),
    Method(
        "LLN+Diag",
        _diag_prefill,
        lambda q, k, v, s: lln_diag_step(q, k, v, ALPHA, BETA, MIX, s, local=LOCAL),
        _synth_diag,
    ),
    Method("EA", _ea_prefill, lambda q, k, v, s: ea_step(q, k, v, s), _synth_ea),
)


def extend_state(method: Method, state: Any, start: int, end: int, cfg: Config, gen) -> Any:
    """Really prefill tokens [start, end) into state, PIECE tokens at a time."""
    for lo in range(start, end, PIECE):
        q, k, v = random_qkv(min(PIECE, end - lo), cfg, gen)
        state = method.prefill(q, k, v, state)
    return state


def build_states(method: Method, cfg: Config, gen: torch.Generator) -> dict[int, tuple[Any, str]]:
    """State at each context: one incremental real prefill while its projected time fits the
    budget, then synthetic states (the last real one rescaled, with the right num_tokens)."""
    states: dict[int, tuple[Any, str]] = {}
    state, done, spent = None, 0, 0.0
    for length in cfg.contexts:
        projected = spent + (spent / done if done else 0.0) * (length - done)
        if state is None or (projected <= cfg.build_budget_s and states[done][1] == "prefill"):
            start = time.perf_counter()
            state = extend_state(method, state, done, length, cfg, gen)
            sync(cfg.device)
            spent += time.perf_counter() - start
            done = length
            states[length] = (state, "prefill")
        else:
            states[length] = (
                method.synthesize(state, done, length),
                f"synthetic (from {fmt_len(done)})",
            )
    print(
        f"  built {method.name} states: {spent:.1f} s of prefill up to {fmt_len(done)}", flush=True
    )
    return states


# ----------------------------------------------------------------------------- decode timing


def time_interleaved(
    fns: dict[tuple[str, int], Callable[[], Any]], cfg: Config
) -> dict[tuple[str, int], float]:
    """Median step time of each fn; rounds visit every fn in turn, so drift hits all alike."""
    times: dict[tuple[str, int], list[float]] = {key: [] for key in fns}
    per_round = max(1, cfg.decode_steps // cfg.decode_rounds)
    for fn in fns.values():
        for _ in range(10):
            fn()
    for _ in range(cfg.decode_rounds):
        for key, fn in fns.items():
            times[key].extend(timed(fn, cfg.device) for _ in range(per_round))
    return {key: statistics.median(ts) for key, ts in times.items()}


def softmax_decode_fns(cache_k: Tensor, cache_v: Tensor, q: Tensor, k: Tensor, v: Tensor):
    """One decode step against a KV cache holding `length` tokens: write the new K/V, attend.

    "enable_gqa": SDPA's own GQA; "grouped q": the G query heads of one KV head as G queries
    (exact for one new token, since it sees every cached key), no KV copy either way.
    """
    length = cache_k.shape[2] - 1
    q_grouped = q.reshape(1, NUM_KV_HEADS, NUM_Q_HEADS // NUM_KV_HEADS, HEAD_DIM)

    def write() -> None:
        cache_k[:, :, length] = k[:, :, 0]
        cache_v[:, :, length] = v[:, :, 0]

    def gqa() -> Tensor:
        write()
        return F.scaled_dot_product_attention(q, cache_k, cache_v, enable_gqa=True)

    def grouped() -> Tensor:
        write()
        return F.scaled_dot_product_attention(q_grouped, cache_k, cache_v)

    return {"enable_gqa": gqa, "grouped q": grouped}


def time_budgeted(fn: Callable[[], Any], max_steps: int, budget_s: float, device) -> float:
    """Median of up to max_steps calls (at least 5), stopping once budget_s is spent."""
    fn()
    times = [timed(fn, device)]
    while len(times) < max_steps and (len(times) < 5 or sum(times) < budget_s):
        times.append(timed(fn, device))
    return statistics.median(times)


def softmax_decode(cfg: Config, gen: torch.Generator) -> dict[int, tuple[float, str]]:
    """Best SDPA variant's median step time at each context, until memory runs out."""
    q, k, v = random_qkv(1, cfg, gen)
    out: dict[int, tuple[float, str]] = {}
    for length in cfg.contexts:
        try:
            shape = (1, NUM_KV_HEADS, length + 1, HEAD_DIM)
            cache_k = torch.randn(shape, generator=gen).to(cfg.device, cfg.dtype)
            cache_v = torch.randn(shape, generator=gen).to(cfg.device, cfg.dtype)
            fns = softmax_decode_fns(cache_k, cache_v, q, k, v)
            best = {
                n: time_budgeted(f, cfg.decode_steps, cfg.softmax_budget_s, cfg.device)
                for n, f in fns.items()
            }
        except (torch.OutOfMemoryError, RuntimeError) as err:
            print(f"  softmax decode stops at {fmt_len(length)}: {err}", flush=True)
            break
        name = min(best, key=best.get)
        out[length] = (best[name], name)
        print(
            f"  softmax decode {fmt_len(length)}: "
            + ", ".join(f"{n} {fmt_time(t)}" for n, t in best.items()),
            flush=True,
        )
        del cache_k, cache_v, fns
    return out


def run_decode(cfg: Config, gen: torch.Generator) -> dict[str, Any]:
    q, k, v = random_qkv(1, cfg, gen)
    fns, how = {}, {}
    for method in METHODS:
        for length, (state, origin) in build_states(method, cfg, gen).items():
            fns[method.name, length] = lambda m=method, s=state: m.step(q, k, v, s)
            how[method.name, length] = origin
    times = time_interleaved(fns, cfg)
    return {"times": times, "how": how, "softmax": softmax_decode(cfg, gen)}


def decode_tables(res: dict[str, Any], cfg: Config) -> tuple[str, dict[str, float]]:
    times, how, soft = res["times"], res["how"], res["softmax"]
    base = {m.name: times[m.name, cfg.contexts[0]] for m in METHODS}
    base_soft = soft[cfg.contexts[0]][0] if cfg.contexts[0] in soft else math.nan
    header = ["context"]
    for name in ("LLN", "LLN+Diag", "EA"):
        header += [name, f"{name} / 1K"]
    header += ["softmax (SDPA)", "softmax / 1K", "softmax / LLN", "SDPA variant"]
    rows = []
    for length in cfg.contexts:
        row = [fmt_len(length)]
        for name in ("LLN", "LLN+Diag", "EA"):
            t = times[name, length]
            row += [fmt_time(t), f"{t / base[name]:.3f}"]
        t_soft, variant = soft.get(length, (math.nan, "out of memory"))
        row += [
            fmt_time(t_soft),
            f"{t_soft / base_soft:.1f}",
            f"{t_soft / times['LLN', length]:.1f}",
        ]
        rows.append([*row, variant])
    how_rows = [[fmt_len(n)] + [how[m.name, n] for m in METHODS] for n in cfg.contexts]
    text = md_table(header, rows) + "\n\nHow each state was built:\n\n"
    text += md_table(["context"] + [m.name for m in METHODS], how_rows)
    last = cfg.contexts[-1]
    ctx = [n for n in cfg.contexts if n in soft]
    cross = crossover(ctx, [times["LLN", n] for n in ctx], [soft[n][0] for n in ctx])
    return text, {"lln_ratio": times["LLN", last] / base["LLN"], "last": last, "cross": cross}


def finish_plot(ax, xs: list[int], labels: tuple[str, str, str], y_fmt: Callable, path: Path):
    """Log-log axes with token-count x ticks, formatted y ticks, grid, legend; save and close."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(xs, [fmt_len(n) for n in xs])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: y_fmt(y)))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(labels[2], fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=120)
    plt.close(ax.figure)


def plot_decode(res: dict[str, Any], cfg: Config, path: Path, subtitle: str) -> None:
    _fig, ax = plt.subplots(figsize=(7.5, 5))
    ctx = list(cfg.contexts)
    for name, marker in (("LLN", "o"), ("LLN+Diag", "s"), ("EA", "^")):
        ax.plot(ctx, [res["times"][name, n] for n in ctx], marker=marker, label=name)
    soft = res["softmax"]
    ax.plot(list(soft), [soft[n][0] for n in soft], marker="x", label="softmax + KV cache (SDPA)")
    title = f"Decode step time vs context length, one attention layer\n{subtitle}"
    labels = ("context length L (tokens)", "time per decode step (median)", title)
    finish_plot(ax, ctx, labels, fmt_time, path)


# ----------------------------------------------------------------------------- prefill


def pick_sdpa_variant(cfg: Config, gen: torch.Generator) -> str:
    """Faster of SDPA's own GQA and pre-expanded KV heads, on a 2K causal prefill."""
    q, k, v = random_qkv(2 * K, cfg, gen)
    best: dict[str, float] = {}
    for name in ("enable_gqa", "expanded KV"):
        fn = softmax_prefill_fn(q, k, v, name)
        fn()
        best[name] = min(timed(fn, cfg.device) for _ in range(3))
    return min(best, key=best.get)


def softmax_prefill_fn(q: Tensor, k: Tensor, v: Tensor, variant: str) -> Callable[[], Tensor]:
    if variant == "enable_gqa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    group = NUM_Q_HEADS // NUM_KV_HEADS

    def expanded() -> Tensor:
        ke, ve = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)

    return expanded


def prefill_fns(q: Tensor, k: Tensor, v: Tensor, cfg: Config, sdpa: str) -> dict[str, Callable]:
    fns: dict[str, Callable] = {
        f"LLN c={c}": (lambda c=c: lln_attention(q, k, v, ALPHA, BETA, chunk_size=c))
        for c in cfg.chunk_sizes
    }
    fns["LLN+Diag c=64"] = lambda: lln_diag_attention(q, k, v, ALPHA, BETA, MIX, local=LOCAL)
    fns["softmax"] = softmax_prefill_fn(q, k, v, sdpa)
    return fns


def time_prefill_length(fns: dict[str, Callable], cfg: Config) -> dict[str, float]:
    """Median over up to prefill_reps interleaved runs; a cell that took long runs once."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(cfg.prefill_reps):
        for name, fn in fns.items():
            if sum(times[name]) < cfg.prefill_cell_budget_s:
                times[name].append(timed(fn, cfg.device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_prefill(cfg: Config, gen: torch.Generator) -> dict[str, Any]:
    sdpa = pick_sdpa_variant(cfg, gen)
    warm = random_qkv(256, cfg, gen)
    for fn in prefill_fns(*warm, cfg, sdpa).values():
        fn()
    results: dict[int, dict[str, float]] = {}
    for length in cfg.prefill_lengths:
        results[length] = time_prefill_length(
            prefill_fns(*random_qkv(length, cfg, gen), cfg, sdpa), cfg
        )
        print(
            f"  prefill {fmt_len(length)}: "
            + ", ".join(f"{n} {fmt_time(t)}" for n, t in results[length].items()),
            flush=True,
        )
    best = min(
        (f"LLN c={c}" for c in cfg.chunk_sizes),
        key=lambda name: sum(results[n][name] for n in cfg.prefill_lengths),
    )
    return {"times": results, "sdpa": sdpa, "best": best}


def crossover(lengths: list[int], fast: list[float], slow: list[float]) -> tuple[float, str]:
    """Length where `fast` (linear) becomes faster than `slow` (quadratic): log-log interpolation
    between measured points, else extrapolation of power laws fitted to the nearest 3 points."""
    logs = [math.log(f / s) for f, s in zip(fast, slow, strict=True)]
    for i in range(len(lengths) - 1):
        if logs[i] >= 0 > logs[i + 1]:
            x0, x1 = math.log(lengths[i]), math.log(lengths[i + 1])
            x = x0 + (x1 - x0) * logs[i] / (logs[i] - logs[i + 1])
            return math.exp(x), "log-log interpolation between measured lengths"
    idx = slice(0, 3) if logs[0] < 0 else slice(-3, None)
    xs = [math.log(n) for n in lengths[idx]]
    slope_f, icpt_f = fit_line(xs, [math.log(t) for t in fast[idx]])
    slope_s, icpt_s = fit_line(xs, [math.log(t) for t in slow[idx]])
    if slope_s <= slope_f:
        return math.nan, "no crossover: the fitted growths do not cross"
    where = "below" if logs[0] < 0 else "above"
    point = math.exp((icpt_f - icpt_s) / (slope_s - slope_f))
    return point, f"extrapolated {where} the measured range from power laws fitted to 3 points"


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return slope, my - slope * mx


def prefill_tables(res: dict[str, Any], cfg: Config) -> tuple[str, dict[str, Any]]:
    times, best = res["times"], res["best"]
    lengths = list(cfg.prefill_lengths)
    names = list(times[lengths[0]])
    rows = [
        [fmt_len(n)]
        + [fmt_time(times[n][m]) for m in names]
        + [f"{times[n]['softmax'] / times[n][best]:.2f}"]
        for n in lengths
    ]
    text = md_table(["T", *names, f"softmax / {best}"], rows)
    summary = growth_summary(times, lengths, ["LLN", "LLN+Diag", "softmax"], best)
    cross = {}
    for name in (best, "LLN+Diag c=64"):
        cross[name] = crossover(
            lengths, [times[n][name] for n in lengths], [times[n]["softmax"] for n in lengths]
        )
    return text + "\n\n" + summary[0], {"growth": summary[1], "cross": cross}


def growth_summary(times, lengths: list[int], labels: list[str], best: str):
    """Time(longest) / time(longest / 8) and the fitted log-log slope over the top 4 lengths."""
    cols = {"LLN": best, "LLN+Diag": "LLN+Diag c=64", "softmax": "softmax"}
    hi, lo = lengths[-1], lengths[-4] if len(lengths) >= 4 else lengths[0]
    rows, growth = [], {}
    for label in labels:
        ys = [math.log(times[n][cols[label]]) for n in lengths[-4:]]
        slope = fit_line([math.log(n) for n in lengths[-4:]], ys)[0]
        growth[label] = (times[hi][cols[label]] / times[lo][cols[label]], slope)
        rows.append([cols[label], f"{growth[label][0]:.1f}", f"{slope:.2f}"])
    header = ["method", f"time({fmt_len(hi)}) / time({fmt_len(lo)})", "log-log slope (top 4 T)"]
    return md_table(header, rows), growth


def add_slope_guides(ax, lengths: list[int], first: dict[str, float]) -> None:
    """Dotted T and T^2 lines from the smallest measured times, to read the growth against."""
    low = min(first.values())
    for power, label, style in ((1, "∝ T", ":"), (2, "∝ T²", "-.")):
        ys = [low * (n / lengths[0]) ** power for n in lengths]
        ax.plot(lengths, ys, color="grey", ls=style, lw=1, label=label)


def plot_prefill(res: dict[str, Any], cfg: Config, cross, path: Path, subtitle: str) -> None:
    _fig, ax = plt.subplots(figsize=(7.5, 5))
    lengths = list(cfg.prefill_lengths)
    for name, marker in ((res["best"], "o"), ("LLN+Diag c=64", "s"), ("softmax", "x")):
        label = "softmax (SDPA, is_causal)" if name == "softmax" else name
        ax.plot(lengths, [res["times"][n][name] for n in lengths], marker=marker, label=label)
    add_slope_guides(ax, lengths, res["times"][lengths[0]])
    point, how = cross[res["best"]]
    xlabel = "prompt length T (tokens)"
    if lengths[0] <= point <= lengths[-1]:
        ax.axvline(point, color="grey", ls="--", lw=1, label=f"LLN = softmax at ≈ {point:,.0f}")
    elif not math.isnan(point):
        xlabel += f"\n{res['best']} = softmax at ≈ {point:,.0f} tokens ({how.split(' from')[0]})"
    title = f"Prefill time vs prompt length, one attention layer\n{subtitle}"
    labels = (xlabel, "prefill time (median)", title)
    finish_plot(ax, lengths, labels, fmt_time, path)


# ----------------------------------------------------------------------------- memory


def state_bytes(contexts: tuple[int, ...]) -> dict[str, list[float]]:
    """Bytes per sequence for the whole model (30 layers), float32 states, bf16 KV cache."""
    lln = LLNState.empty(1, NUM_KV_HEADS, HEAD_DIM).nbytes * NUM_LAYERS
    diag = empty_lln_diag_state(1, NUM_KV_HEADS, HEAD_DIM, LOCAL).nbytes * NUM_LAYERS
    ea = EAState.empty(1, NUM_KV_HEADS, HEAD_DIM).nbytes * NUM_LAYERS
    kv = [kv_cache_bytes(n, NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM) for n in contexts]
    n = len(contexts)
    return {"LLN": [lln] * n, "LLN+Diag": [diag] * n, "EA": [ea] * n, "KV cache (bf16)": kv}


def memory_table(cfg: Config) -> str:
    data = state_bytes(cfg.contexts)
    names = list(data)
    rows = [
        [fmt_len(n)]
        + [fmt_bytes(data[m][i]) for m in names]
        + [f"{data['KV cache (bf16)'][i] / data['LLN'][i]:,.0f}"]
        for i, n in enumerate(cfg.contexts)
    ]
    exact = ", ".join(f"{m} {data[m][0]:,} B" for m in ("LLN", "LLN+Diag", "EA"))
    note = (
        f"\n\nPer sequence, whatever the context: {exact}. LLN+Diag's LocalKV (4 sinks + 64-token "
        "window, K and V) is float32, as `empty_lln_diag_state` allocates it "
        f"({fmt_bytes(diag_local_bytes(torch.float32))} of it; bf16 would make that "
        f"{fmt_bytes(diag_local_bytes(torch.bfloat16))}). KV cache: 2 x 30 x 3 x 64 x 2 B = "
        f"{kv_cache_bytes(1, NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM):,} B per token."
    )
    return md_table(["context", *names, "KV cache / LLN"], rows) + note


def diag_local_bytes(dtype: torch.dtype) -> int:
    local = LOCAL.empty_cache(1, NUM_KV_HEADS, HEAD_DIM, dtype=dtype)
    return local.nbytes * NUM_LAYERS


def plot_memory(cfg: Config, path: Path) -> None:
    data = state_bytes(cfg.contexts)
    _fig, ax = plt.subplots(figsize=(7.5, 5))
    for (name, values), marker in zip(data.items(), "os^x", strict=True):
        constant = values[0] == values[-1]
        label = f"{name}: {values[0] / 1e6:.3g} MB at any L" if constant else name
        ax.plot(cfg.contexts, values, marker=marker, label=label)
    title = (
        "State bytes per sequence vs context, whole SmolLM2-135M (30 layers)\n"
        "LLN, LLN+Diag, EA states in float32; softmax KV cache in bf16"
    )
    labels = ("context length L (tokens)", "bytes per sequence", title)
    finish_plot(ax, list(cfg.contexts), labels, fmt_si_bytes, path)


# ----------------------------------------------------------------------------- report


def header_line(cfg: Config, argv: list[str]) -> str:
    command = shlex.join([".venv/bin/python", "benchmarks/bench_ops.py", *argv])
    device = torch.cuda.get_device_name(cfg.device) if cfg.device.type == "cuda" else "CPU"
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"`{command}` — {date} — torch {torch.__version__} — device {device} "
        f"({str(cfg.dtype).removeprefix('torch.')}) — {torch.get_num_threads()} torch thread(s)"
    )


def goals_text(dec: dict[str, Any], growth: dict[str, Any], cross: dict[str, Any], cfg) -> str:
    lln_growth, soft_growth = growth["LLN"], growth["softmax"]
    lengths = cfg.prefill_lengths
    span = f"{fmt_len(lengths[-1])}/{fmt_len(lengths[-4] if len(lengths) >= 4 else lengths[0])}"
    lines = [
        f"- Decode: LLN at {fmt_len(dec['last'])} / LLN at 1K = {dec['lln_ratio']:.3f} "
        f"(goal <= 1.1: {'met' if dec['lln_ratio'] <= 1.1 else 'NOT met'}). LLN's step is "
        f"faster than softmax's from ≈ {dec['cross'][0]:,.0f} tokens of context "
        f"({dec['cross'][1]}).",
        f"- Prefill: LLN time {span} = {lln_growth[0]:.1f} (goal <= 10: "
        f"{'met' if lln_growth[0] <= 10 else 'NOT met'}; log-log slope {lln_growth[1]:.2f}); "
        f"softmax {soft_growth[0]:.1f} (slope {soft_growth[1]:.2f}; quadratic would be 64, 2.0).",
    ]
    for name, (point, how) in cross.items():
        where = "none" if math.isnan(point) else f"≈ {point:,.0f} tokens"
        lines.append(f"- Crossover {name} vs softmax prefill: {where} ({how}).")
    return "\n".join(lines)


def decode_intro(cfg: Config) -> str:
    return (
        "One step = one new token attending to a context of L tokens; every step restarts from "
        "the same state, so the context stays L. LLN / LLN+Diag / EA: their `*_step` on a state "
        f"of L tokens, {cfg.decode_steps} steps each after 10 warm-up steps, interleaved over "
        f"{cfg.decode_rounds} rounds. Softmax: write the new K/V into a KV cache of L tokens, "
        "then SDPA with one query token; the faster of two GQA forms (neither copies the KV), "
        f"median of up to {cfg.decode_steps} steps or {cfg.softmax_budget_s:.0f} s."
    )


def prefill_intro(cfg: Config, pre_res: dict[str, Any]) -> str:
    return (
        f"Chunked LLN (`lln_attention`, chunk sizes {', '.join(map(str, cfg.chunk_sizes))}; "
        f"fastest over all T: {pre_res['best']}), LLN+Diag (`lln_diag_attention`, chunk 64), "
        f"softmax (SDPA, is_causal=True, GQA by {pre_res['sdpa']}: the faster on a 2K check). "
        f"Median of up to {cfg.prefill_reps} interleaved runs; a cell stops repeating once it "
        f"has taken {cfg.prefill_cell_budget_s:.0f} s."
    )


def render(cfg: Config, argv: list[str], sections: dict[str, str], runtime_s: float) -> str:
    setup = (
        f"alpha = beta = {ALPHA:.4f} (moment-matched for unit-variance q, k); q, k, v ~ N(0, 1). "
        f"LLN+Diag: window 64 + 4 sinks, combine 'joint', mix (log-weight) {MIX}. "
        f"Total runtime {runtime_s / 60:.1f} min."
    )
    parts = [
        "# Attention kernels: one layer of SmolLM2-135M's shape (Hq=9, Hkv=3, d=64, batch 1)",
        header_line(cfg, argv),
        setup,
        "## Goals",
        sections["goals"],
        "## 1. Decode step time against context (median per step)",
        sections["decode"],
        "## 2. Prefill time against prompt length (median)",
        sections["prefill"],
        "## 3. State bytes per sequence, whole model (30 layers, 3 KV heads, d = 64)",
        memory_table(cfg),
        "Plots: `bench_ops_decode.png`, `bench_ops_prefill.png`, `bench_ops_memory.png`.",
    ]
    return "\n\n".join(parts)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="q/k/v dtype (default: float32 on cpu, bfloat16 on cuda)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: stable on shared cores)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = make_config(args)
    args.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    dtype_name = str(cfg.dtype).removeprefix("torch.")
    subtitle = (
        f"{cfg.device.type.upper()}, {dtype_name}, {torch.get_num_threads()} thread(s); "
        "Hq=9, Hkv=3, d=64, batch 1"
    )
    started = time.perf_counter()
    with torch.inference_mode():
        print("decode ...", flush=True)
        dec_res = run_decode(cfg, gen)
        print("prefill ...", flush=True)
        pre_res = run_prefill(cfg, gen)
    dec_text, dec = decode_tables(dec_res, cfg)
    pre_text, pre = prefill_tables(pre_res, cfg)
    plot_decode(dec_res, cfg, args.out / "bench_ops_decode.png", subtitle)
    plot_prefill(pre_res, cfg, pre["cross"], args.out / "bench_ops_prefill.png", subtitle)
    plot_memory(cfg, args.out / "bench_ops_memory.png")
    sections = {
        "goals": goals_text(dec, pre["growth"], pre["cross"], cfg),
        "decode": decode_intro(cfg) + "\n\n" + dec_text,
        "prefill": prefill_intro(cfg, pre_res) + "\n\n" + pre_text,
    }
    report = render(cfg, argv, sections, time.perf_counter() - started)
    print(report)
    (args.out / "bench_ops.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
