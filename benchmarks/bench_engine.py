"""Engine benchmark on the default model: batching, chunked prefill under load, memory.

    .venv/bin/python benchmarks/bench_engine.py [--quick] [--device cuda] [--out benchmarks/results]

1. Aggregate decode tokens/s with 1, 4, 16, 64 concurrent sequences (short prompts, every
   sequence generating the same number of tokens; the clock runs from the first to the last
   decode step, so prefill is not counted).
2. Inter-token latency of 8 decoding sequences while a long prompt (32K tokens) arrives and is
   prefilled in chunks beside them: median and p99 of the gaps between their tokens.
3. Process RSS with 64 live sequences at 1K and at 32K tokens of context: one request with
   n = 64 whose prompt has that length (the engine prefills it once and forks the state into
   64 slots), measured while all 64 decode, next to the KV cache a softmax model of the same
   shape would hold. On CUDA: the GPU memory allocated by torch (peak) instead of RSS, and
   results in bench_engine_cuda.md / .png.

`--goals` measures instead issue 18's GPU goals (tables in bench_engine_goals.md, or
bench_engine_cuda_goals.md on CUDA, and the step's profile in *_profile.txt): batch-1 decode ms
per token (engine only), peak decode tokens/s at 1,024 sequences, time to first token of a
32K-token prompt, a torch.profiler summary of one decode step (device kernel time against wall
time), and the peer: the same weights as a softmax Llama in transformers with its static KV
cache (`softmax_peer.py`). `--quick` shrinks every size (a CPU smoke run).

`--dtypes float32 int8` measures instead decode tokens/s at 1 and 16 sequences for each weight
dtype (issue 19: 16 sequences >= 6x one): bench_engine_dtypes.md; `int8+fast` the same without
`--deterministic` (its cost: `--dtypes int8 int8+fast float32 float32+fast`).

`--guided` measures instead what structured outputs cost per decode step (the llguidance mask
and token bookkeeping), 1 and 16 sequences under a JSON schema next to the same number
unconstrained, in one run: bench_engine_guided.md.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import time
from pathlib import Path

import matplotlib
import torch

from lln_core.state import kv_cache_bytes
from models.registry import DEFAULT_MODEL
from server.config import EngineConfig
from server.engine import LLMEngine
from server.request import SamplingParams

matplotlib.use("Agg")
import matplotlib.pyplot as plt

GENERATE = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def make_engine(max_num_seqs: int, device: str, **overrides) -> LLMEngine:
    chunk = overrides.pop("prefill_chunk_size", 512)
    config = EngineConfig(
        model=DEFAULT_MODEL,
        device=device,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=chunk + max_num_seqs,  # every decode plus one full chunk
        prefill_chunk_size=chunk,
        prefix_cache_bytes=0,
        **overrides,
    )
    return LLMEngine(config)


def random_prompt(length: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (length,), generator=gen).tolist()


def decode_throughput(engine: LLMEngine, concurrency: int, tag: str = "") -> float:
    """Decode tokens/s of `concurrency` sequences stepping together."""
    for i in range(concurrency):
        engine.add_request(f"c{concurrency}{tag}-{i}", random_prompt(16, i), GENERATE)
    while any(not r.is_prefill_done for r in engine.scheduler.waiting) or any(
        not r.is_prefill_done for r in engine.scheduler.running
    ):
        engine.step()  # prefill every prompt first
    start, tokens = time.perf_counter(), 0
    while engine.has_unfinished():
        tokens += sum(len(o.token_ids) for o in engine.step())
    return tokens / (time.perf_counter() - start)


GUIDED_SCHEMA = {  # long enough outputs to time many constrained steps
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 40, "maxLength": 200},
        "year": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 3},
    },
    "required": ["title", "year", "tags"],
}


def guided_step_cost(engine: LLMEngine, concurrency: int, guided: bool) -> dict:
    """ms per decode step of `concurrency` sequences (seeded sampling, 24 tokens each), and
    the part spent computing structured-output masks."""
    from server.request import GuidedSpec

    spec = GuidedSpec.json_schema(GUIDED_SCHEMA) if guided else None
    for i in range(concurrency):
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=24, guided=spec)
        engine.add_request(f"g{guided}{concurrency}-{i}", random_prompt(16, i), params)
    while any(not r.is_prefill_done for r in [*engine.scheduler.waiting,
                                              *engine.scheduler.running]):  # fmt: skip
        engine.step()
    masks, allowed = [], engine.guided.allowed

    def timed(*args):
        began = time.perf_counter()
        result = allowed(*args)
        masks.append(time.perf_counter() - began)
        return result

    engine.guided.allowed = timed
    steps = []
    try:
        while engine.has_unfinished():
            began = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - began)
    finally:
        engine.guided.allowed = allowed
    return {"step": statistics.median(steps) * 1e3, "mask": statistics.median(masks) * 1e3}


def guided_report(engine: LLMEngine, out: Path) -> str:
    for guided in (False, True):  # warm-up: compiles, builds the llguidance tokenizer
        guided_step_cost(engine, 2, guided)
    rows = []
    for n in (1, 16):
        plain, constrained = (guided_step_cost(engine, n, g) for g in (False, True))
        rows.append(
            f"| {n} | {plain['step']:.1f} | {constrained['step']:.1f} | "
            f"{constrained['step'] / plain['step']:.3f} | {constrained['mask']:.2f} |"
        )
    text = "\n".join([
        f"# Structured-output cost per decode step, {DEFAULT_MODEL}, CPU float32, "
        f"{torch.get_num_threads()} threads",
        "",
        f"`.venv/bin/python benchmarks/bench_engine.py --guided` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} UTC; medians over the decode steps of 24 tokens "
        "per sequence, seeded sampling, a JSON schema (llguidance) against none.",
        "",
        "| sequences | step ms, free | step ms, JSON schema | ratio | mask ms (all rows) |",
        "|---|---|---|---|---|",
        *rows,
    ]) + "\n"  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_engine_guided.md").write_text(text)
    return text


def step_times(
    engine: LLMEngine, count: int, max_tokens: int, tag: str, prompt: int = 16
) -> list[float]:
    """Seconds of each decode step of `count` sequences generating max_tokens each from
    `prompt`-token prompts (prefilled first, not timed)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i in range(count):
        engine.add_request(f"{tag}-{i}", random_prompt(prompt, i), params)
    while any(not r.is_prefill_done for r in [*engine.scheduler.waiting,
                                              *engine.scheduler.running]):  # fmt: skip
        engine.step()
    times = []
    while engine.has_unfinished():
        began = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - began)
    return times


def time_to_first_token(engine: LLMEngine, length: int, tag: str) -> float:
    """Seconds from add_request to the first generated token of a `length`-token prompt."""
    began = time.perf_counter()
    engine.add_request(tag, random_prompt(length, 11), SamplingParams(max_tokens=1))
    while engine.has_unfinished():
        if any(out.token_ids for out in engine.step()):
            break
    return time.perf_counter() - began


def step_profile(engine: LLMEngine, count: int, device: str, path: Path) -> dict:
    """torch.profiler over 5 decode steps of `count` sequences: wall ms per step and, on CUDA,
    the device's kernel time per step (the rest of the wall time is the host's); the top ops
    by device (else CPU) time go to `path`."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    for i in range(count):
        engine.add_request(f"prof-{i}", random_prompt(16, i), params)
    for _ in range(8):
        engine.step()  # prefilled, decoding
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    steps = 5
    with profile(activities=activities) as prof:
        began = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - began) / steps
    for i in range(count):
        engine.abort(f"prof-{i}")
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    path.write_text(events.table(sort_by=key, row_limit=25) + "\n")
    kernel = sum(e.self_device_time_total for e in events) / steps / 1e6 if cuda else None
    return {"wall_ms": wall * 1e3, "kernel_ms": None if kernel is None else kernel * 1e3}


def goals_report(device: str, quick: bool, out: Path) -> str:
    """Issue 18's goals on `device`, next to the softmax peer; see the module docstring."""
    from softmax_peer import peer_decode, softmax_peer  # benchmarks/, the script's folder

    cuda = device.startswith("cuda")
    peak_n, prompt, new_tokens = (4, 256, 8) if quick else (1024, 32768, 64)
    out.mkdir(parents=True, exist_ok=True)
    name = "bench_engine_cuda_goals" if cuda else "bench_engine_goals"
    engine = make_engine(peak_n, device)
    step_times(engine, 2, 4, "warm-up")  # compiles (graphs were captured at start)
    one = statistics.median(step_times(engine, 1, new_tokens, "one")) * 1e3
    peak = decode_throughput(engine, peak_n, "-peak")
    profile = step_profile(engine, min(peak_n, 64), device, out / f"{name}_profile.txt")
    config, graphs = engine.config, bool(engine.runner.decoder.graphs)
    peer_model = softmax_peer(engine.model)
    del engine
    ttft_engine = make_engine(1, device, prefill_chunk_size=2048 if quick else 8192)
    time_to_first_token(ttft_engine, 64, "ttft-warm-up")
    ttft = time_to_first_token(ttft_engine, prompt, "ttft")
    del ttft_engine
    peer_one = peer_decode(peer_model, 1, 16, new_tokens)
    peer_batch = 2 if quick else 256
    peer_many = peer_decode(peer_model, peer_batch, 16, new_tokens)
    kernel = profile["kernel_ms"]
    host = "" if kernel is None else (
        f", device kernels {kernel:.2f} ms ({kernel / profile['wall_ms']:.0%}), host and idle "
        f"the rest")  # fmt: skip
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    text = "\n".join([
        f"# GPU goals, {DEFAULT_MODEL} on {where}, weights {config.weight_dtype}, "
        f"CUDA graphs {'on' if graphs else 'off'}, torch {torch.__version__}",
        "",
        f"`bench_engine.py --goals --device {device}{' --quick' if quick else ''}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} UTC. Peer: the same weights as a softmax Llama in "
        "transformers, static KV cache (`generate(cache_implementation='static')`, compiled on "
        "CUDA).",
        "",
        "| measure | engine | softmax peer | goal |",
        "|---|---|---|---|",
        f"| batch-1 decode, ms/token | {one:.2f} | {peer_one['ms_per_step']:.2f} | <= 3 |",
        f"| decode tokens/s, {peak_n:,} sequences (peer: {peer_batch}) | {peak:,.0f} | "
        f"{peer_many['tokens_per_s']:,.0f} | >= 40,000 |",
        f"| time to first token, {prompt:,}-token prompt, s | {ttft:.2f} | | <= 1 |",
        "",
        f"One decode step of {min(peak_n, 64)} sequences under torch.profiler: wall "
        f"{profile['wall_ms']:.2f} ms per step{host}. Top ops: `{name}_profile.txt`.",
    ]) + "\n"  # fmt: skip
    (out / f"{name}.md").write_text(text)
    return text


def latency_under_long_prefill(engine: LLMEngine, long_prompt: int) -> dict:
    """Gaps between consecutive tokens of 8 decoding sequences while a long prompt is
    prefilled in chunks."""
    params = SamplingParams(temperature=0.0, max_tokens=100_000, ignore_eos=True)
    for i in range(8):
        engine.add_request(f"d{i}", random_prompt(16, 100 + i), params)
    for _ in range(4):
        engine.step()  # all eight are decoding
    engine.add_request("long", random_prompt(long_prompt, 7), SamplingParams(max_tokens=1))
    last: dict[str, float] = {}
    gaps, solo = [], []
    while engine.scheduler.get("long") is not None:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            if out.request_id in last:
                gaps.append(now - last[out.request_id])
            last[out.request_id] = now
    for _ in range(20):  # the same sequences once the long prompt is done
        engine.step()
        solo.append(time.perf_counter())
    for i in range(8):
        engine.abort(f"d{i}")
    quiet = statistics.median(b - a for a, b in itertools.pairwise(solo))
    gaps.sort()
    return {
        "median": statistics.median(gaps),
        "p99": gaps[int(0.99 * (len(gaps) - 1))],
        "max": gaps[-1],
        "quiet": quiet,
        "steps": len(gaps) // 8,
    }


def rss_with_live_sequences(context: int, device: str, count: int = 64) -> dict:
    """RSS (GPU memory on CUDA) while `count` forked sequences at `context` tokens decode."""
    gc.collect()
    engine = make_engine(count, device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    params = SamplingParams(n=count, temperature=1.0, seed=0, max_tokens=8, ignore_eos=True)
    engine.add_request("live", random_prompt(context, 3), params)
    peak = 0
    while engine.has_unfinished():
        engine.step()
        if engine.pool.num_used == count:
            peak = max(peak, _memory_bytes(device))
    return {
        "rss": peak,
        "state_bytes": engine.pool.bytes_per_slot * count,
        "kv_bytes": count * kv_cache_bytes(context, 30, 3, 64, bytes_per_elem=4),
    }


def report(
    throughput: dict, latency: dict, memory: dict, long_prompt: int, device: str, out: Path
) -> str:
    one = throughput[1]
    cuda = device.startswith("cuda")
    where = (
        f"{torch.cuda.get_device_name()} float32"
        if cuda
        else f"CPU float32, {torch.get_num_threads()} threads"
    )
    flag = f" --device {device}" if cuda else ""
    lines = [
        f"# Engine on {DEFAULT_MODEL}, {where}, torch {torch.__version__}",
        "",
        f"`.venv/bin/python benchmarks/bench_engine.py{flag}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} UTC.",
        "",
        "| concurrent sequences | decode tokens/s | x one sequence |",
        "|---|---|---|",
        *[f"| {n} | {tps:.1f} | {tps / one:.2f} |" for n, tps in throughput.items()],
        "",
        f"8 sequences decoding while a {long_prompt:,}-token prompt is prefilled in chunks of "
        f"512 ({latency['steps']} steps): inter-token latency median "
        f"{latency['median'] * 1e3:.0f} ms, p99 {latency['p99'] * 1e3:.0f} ms "
        f"(p99 / median = {latency['p99'] / latency['median']:.2f}), max "
        f"{latency['max'] * 1e3:.0f} ms; without the long prompt {latency['quiet'] * 1e3:.0f} ms.",
        "",
        f"| 64 live sequences at | {'GPU memory' if cuda else 'process RSS'} | their states "
        "| softmax KV cache, same shape |",
        "|---|---|---|---|",
        *[
            f"| {c:,} tokens | {m['rss'] / 2**30:.2f} GiB | {m['state_bytes'] / 2**20:.0f} MiB "
            f"| {m['kv_bytes'] / 2**30:.1f} GiB |"
            for c, m in memory.items()
        ],
    ]
    contexts = sorted(memory)
    if len(contexts) > 1:
        ratio = memory[contexts[-1]]["rss"] / memory[contexts[0]]["rss"]
        measure = "GPU memory" if cuda else "RSS"
        lines += [
            "",
            f"{measure} {contexts[-1]:,} / {contexts[0]:,} = {ratio:.3f} (goal <= 1.2).",
        ]
    lines += [
        "",
        "Goals: 16 sequences >= 6x the tokens/s of one "
        f"({throughput.get(16, 0) / one:.1f}x); p99 <= 3x median "
        f"({latency['p99'] / latency['median']:.2f}x).",
    ]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    name = "bench_engine_cuda" if cuda else "bench_engine"
    (out / f"{name}.md").write_text(text)
    plot(throughput, memory, out / f"{name}.png")
    return text


def plot(throughput: dict, memory: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    counts = list(throughput)
    axes[0].plot(counts, [throughput[n] for n in counts], "o-", label="engine")
    axes[0].plot(counts, [throughput[1] * n for n in counts], ":", color="gray", label="linear")
    axes[0].set(xscale="log", yscale="log", xlabel="concurrent sequences", ylabel="tokens / s")
    axes[0].set_title("aggregate decode throughput")
    contexts = sorted(memory)
    axes[1].plot(contexts, [memory[c]["rss"] / 2**30 for c in contexts], "o-", label="RSS")
    axes[1].plot(contexts, [memory[c]["kv_bytes"] / 2**30 for c in contexts], "s--",
                 label="softmax KV cache (64 sequences)")  # fmt: skip
    axes[1].set(xscale="log", yscale="log", xlabel="context per sequence", ylabel="GiB")
    axes[1].set_title("memory, 64 live sequences")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


DTYPE_ROUNDS = 5


def dtypes_report(dtypes: list[str], device: str, out: Path) -> str:
    """Decode tokens/s at 1 and 16 sequences for each weight dtype, engines one after another
    in one process (issue 19: 16 sequences >= 6x one): bench_engine_dtypes.md. An entry
    DTYPE:GEMM also sets `--gemm-dtype` (float32 weights: float32:float32, float32:bfloat16);
    a suffix +fast runs it with `--no-deterministic` (the fastest kernel per batch size)."""
    rows = []
    for entry in dtypes:
        spec = entry.removesuffix("+fast")
        dtype, _, gemm = spec.partition(":")
        engine = make_engine(16, device, dtype=dtype, gemm_dtype=gemm or "auto",
                             deterministic=spec == entry)  # fmt: skip
        for n in (1, 16):  # warm-up: compiles the decode step for both batch sizes
            decode_throughput(engine, n, "-warm-up")
        # alternating rounds: one short run each is at the mercy of the machine's speed spells
        runs = [(decode_throughput(engine, 1, f"-{r}"), decode_throughput(engine, 16, f"-{r}"))
                for r in range(DTYPE_ROUNDS)]  # fmt: skip
        one, sixteen = (statistics.median(run[i] for run in runs) for i in (0, 1))
        ratio = statistics.median(b / a for a, b in runs)
        rows.append(f"| {entry} | {one:.1f} | {sixteen:.1f} | {ratio:.2f} |")
        print(rows[-1], flush=True)
        del engine
        gc.collect()
    text = "\n".join([
        f"# Decode tokens/s by weight dtype, {DEFAULT_MODEL}, {device}, "
        f"{torch.get_num_threads()} threads",
        "",
        f"`.venv/bin/python benchmarks/bench_engine.py --dtypes {' '.join(dtypes)}` on "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Medians of {DTYPE_ROUNDS} rounds, each a 1-sequence then a 16-sequence run; 16 / 1 is "
        "the median of the rounds' ratios.",
        "",
        "| weights[:GEMMs][+fast: not deterministic] | 1 sequence tok/s | 16 sequences tok/s "
        "| 16 / 1 |",
        "|---|---|---|---|",
        *rows,
    ])  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_engine_dtypes.md").write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, smoke test")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--guided", action="store_true", help="structured-output cost only")
    parser.add_argument("--goals", action="store_true", help="issue 18's GPU goals only")
    parser.add_argument("--dtypes", nargs="+", metavar="DTYPE",
                        help="only decode tok/s at 1 and 16 sequences per dtype")  # fmt: skip
    args = parser.parse_args()
    if args.dtypes:
        print(dtypes_report(args.dtypes, args.device, args.out))
        return
    if args.goals:
        print(goals_report(args.device, args.quick, args.out))
        return
    if args.guided:
        print(guided_report(make_engine(16, args.device), args.out))
        return
    counts = [1, 4] if args.quick else [1, 4, 16, 64]
    if args.device.startswith("cuda") and not args.quick:
        counts.append(256)
    long_prompt = 2048 if args.quick else 32768
    contexts = [256, 1024] if args.quick else [1024, 32768]
    engine = make_engine(max(counts), args.device)
    for n in (1, 2):  # warm-up: compiles the decode layers (batch 1, then a dynamic batch)
        decode_throughput(engine, n, "-warm-up")
    throughput = {n: decode_throughput(engine, n) for n in counts}
    print(throughput, flush=True)
    latency = latency_under_long_prefill(make_engine(9, args.device), long_prompt)
    print(latency, flush=True)
    del engine
    memory = {c: rss_with_live_sequences(c, args.device) for c in contexts}
    print(report(throughput, latency, memory, long_prompt, args.device, args.out))


def _memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


if __name__ == "__main__":
    main()
