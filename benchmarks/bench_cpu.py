"""CPU decode and prefill of the default model by weight format, next to llama.cpp on the same
model's GGUF files, batch 1, one run.

    .venv/bin/python benchmarks/bench_cpu.py [--contexts 256 1024 4096 16384] [--variants ...]
        [--quick]

lln-serve: the default model in float32, float32 with bfloat16 prefill GEMMs (`--gemm-dtype`,
the server's CPU default), bfloat16 and int8 (`--dtype`; decode GEMVs through lln-serve's VNNI
kernel, and through PyTorch's `_weight_int8pack_mm`), and float32 / int8 without the sparse
cache (the decode cost of the cache, issue 16's ratio), decode compiled and in place as the
server runs it (`bench_model`'s steps, timed round-robin so machine noise hits all alike);
prefill chunked by 4,096 tokens as the engine prefills. Decode at 32K and 1M: a real state
relabelled as that long (the step's cost does not depend on its content).

llama.cpp: `benchmarks/llamacpp_runner.py` run with the Python that has `llama-cpp-python`
(`--llamacpp-python`, default /work/llamacpp-venv/bin/python; skipped, saying so, where there is
none) on the Q4_1 GGUF the default model is made from and a Q8_0 made from it, same threads,
one context after another (its KV cache grows: every length is real, up to 32K).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_model import (  # benchmarks/, the script's folder
    PREFILL_CHUNK,
    interleaved_rounds,
    lln_step,
    synthetic_states,
)
from bench_quality import CHATS, chat_samples

from models.quantize import Int8Linear
from models.registry import DEFAULT_MODEL, load_model, smollm2_gguf

VARIANTS = {  # name -> (dtype, overrides)
    "float32": (torch.float32, {}),
    "float32, bfloat16 GEMMs": (torch.float32, dict(gemm_dtype=torch.bfloat16)),  # CPU default
    "bfloat16": (torch.bfloat16, {}),
    "int8": (torch.int8, {}),  # decode GEMVs: lln-serve's VNNI kernel where the CPU has it
    "int8, PyTorch's int8 GEMV": (torch.int8, dict(vnni=False)),  # _weight_int8pack_mm
    "int4": (torch.int4, {}),  # Q4_1's groups through PyTorch's 4-bit kernel, the head int8
    "float32, no sparse cache": (torch.float32, dict(sparse_cache_size=0, kv_cache_dtype="auto")),
    "int8, no sparse cache": (torch.int8, dict(sparse_cache_size=0, kv_cache_dtype="auto")),
}
SYNTHETIC = (32768, 1 << 20)
LLAMACPP_CONTEXTS = (256, 1024, 4096, 16384, 32768)


def load_variant(dtype: torch.dtype, overrides: dict):
    """The default model as `dtype`; `vnni=False`: int8 decode through `_weight_int8pack_mm`."""
    overrides = dict(overrides)
    vnni = overrides.pop("vnni", True)
    model = load_model(DEFAULT_MODEL, dtype=dtype, progress=False, **overrides)[0]
    for layer in model.modules():
        if isinstance(layer, Int8Linear):
            layer.vnni = layer.vnni and vnni
    return model


@torch.no_grad()
def prefill(model, context: int):
    ids = torch.randint(0, 49152, (1, context), generator=torch.Generator().manual_seed(context))
    start, states = time.perf_counter(), None
    for first in range(0, context, PREFILL_CHUNK):
        _, states = model.forward_states(ids[:, first : first + PREFILL_CHUNK], states, None, 1)
    return context / (time.perf_counter() - start), states, ids[:, -1:]


def run_lln(contexts: list[int], rounds: int, names: list[str]) -> dict:
    results: dict = {name: {} for name in names}
    steps: dict = {}
    for name in names:
        model = load_variant(*VARIANTS[name])
        model.compile_decode(cpp_wrapper=True)  # as the server on a CPU
        prefill(model, 64)  # first-call costs are not prefill
        for context in contexts:
            tok_s, states, token = prefill(model, context)
            results[name][context] = {"prefill": tok_s}
            steps[name, context] = lln_step(model, states, token)
            print(f"{name:26s} L={context:>6,}: prefill {tok_s:6.0f} tok/s", flush=True)
        for length in SYNTHETIC:
            steps[name, length] = lln_step(model, synthetic_states(states, length), token)
            results[name][length] = {"prefill": None}
    print("decode: interleaved rounds ...", flush=True)
    for (name, context), per_round in interleaved_rounds(steps, rounds).items():
        results[name][context]["decode_ms"] = statistics.median(per_round) * 1e3
    return results


# llama.cpp's settings, each a row: llama-cpp-python's default (flash attention off), then as
# llama.cpp's own server runs by default (flash attention on), and with a q8_0 KV cache
LLAMACPP_SETTINGS = {
    "": [],
    ", flash attention": ["--flash-attn"],
    ", flash attention, q8_0 KV": ["--flash-attn", "--kv-type", "q8_0"],
}


def run_llamacpp(python: Path, threads: int, contexts: list[int], tokens: int) -> dict:
    """{setting name: {context: {"prefill": tok/s, "decode_ms": ms}}}, {} without llama.cpp:
    the default's own Q4_1 file under every setting, a Q8_0 file (if there) with flash on."""
    if not python.is_file():
        print(f"llama.cpp skipped: no {python} (see benchmarks/llamacpp_runner.py)", flush=True)
        return {}
    runner = Path(__file__).with_name("llamacpp_runner.py")
    q4 = smollm2_gguf()
    q8 = q4.with_name(q4.name.replace("Q4_1", "Q8_0"))
    runs = [(q4, setting) for setting in LLAMACPP_SETTINGS] + [(q8, ", flash attention")]
    results = {}
    for gguf, setting in runs:
        if not gguf.is_file():
            print(f"llama.cpp: no {gguf}, skipped", flush=True)
            continue
        command = [str(python), str(runner), "--gguf", str(gguf), "--threads", str(threads),
                   "--decode-tokens", str(tokens), "--contexts", *map(str, contexts),
                   *LLAMACPP_SETTINGS[setting]]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        name = f"llama.cpp {gguf.stem.split('.')[-1]}{setting}"
        results[name] = {r["context"]: {"prefill": r["prefill_tok_s"], "decode_ms": r["decode_ms"]}
                         for r in rows}  # fmt: skip
        results[name]["version"] = rows[0]["llama_cpp_python"] if rows else "?"
        print(name, results[name], flush=True)
    return results


def report(lln: dict, cpp: dict, contexts: list[int], out: Path) -> str:
    versions = {name: r.pop("version") for name, r in cpp.items()}
    table = {**lln, **cpp}
    lengths = sorted({c for r in table.values() for c in r})
    names = list(table)
    lines = [
        f"# CPU decode and prefill by weight format, {DEFAULT_MODEL}, batch 1, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
        + (f", llama-cpp-python {next(iter(versions.values()))}" if versions else ""),
        "",
        f"`.venv/bin/python {' '.join(['benchmarks/bench_cpu.py', *sys.argv[1:]])}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} UTC; "
        "lln-serve decode at 32K and 1M: a real state relabelled as that long.",
        "",
        "| context | " + " | ".join(f"{n}: decode ms" for n in names) + " | "
        + " | ".join(f"{n}: prefill tok/s" for n in names) + " |",
        "|---" * (1 + 2 * len(names)) + "|",
    ]  # fmt: skip
    for length in lengths:
        decode = [table[n].get(length, {}).get("decode_ms") for n in names]
        fill = [table[n].get(length, {}).get("prefill") for n in names]
        cells = [f"{x:.1f}" if x else "" for x in decode] + [f"{x:.0f}" if x else "" for x in fill]
        lines.append(f"| {length:,} | " + " | ".join(cells) + " |")
    lines += ["", *goals(lln, cpp, contexts)]
    text = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cpu.md").write_text(text)
    return text


def goals(lln: dict, cpp: dict, contexts: list[int]) -> list[str]:
    def decode(name: str, length: int) -> float:
        return lln[name][length]["decode_ms"]

    first, every = contexts[0], [*contexts, *SYNTHETIC]
    lines = ["Goals:"]
    for name in [n for n in ("float32", "bfloat16", "int8") if n in lln]:
        worst = max(decode(name, c) for c in every)
        lines.append(
            f"- {name}: worst decode {worst:.1f} ms (int8 goal <= 25), 1M / {first} = "
            f"{decode(name, SYNTHETIC[-1]) / decode(name, first):.2f} (goal <= 1.1), slowest "
            f"prefill {min(lln[name][c]['prefill'] for c in contexts):.0f} tok/s (goal >= 350)"
        )
    for dtype in [d for d in ("float32", "int8") if {d, f"{d}, no sparse cache"} <= set(lln)]:
        ratios = [decode(dtype, c) / decode(f"{dtype}, no sparse cache", c) for c in every]
        lines.append(f"- sparse cache, {dtype}: decode with / without {min(ratios):.2f}-"
                     f"{max(ratios):.2f} over {first}..1M (bar <= 1.2)")  # fmt: skip
    for length in sorted({c for r in cpp.values() for c in r}):
        fastest = min(cpp, key=lambda n: cpp[n].get(length, {}).get("decode_ms", float("inf")))
        if length not in cpp[fastest]:
            continue
        for name in [n for n in ("int8", "int4") if length in lln.get(n, {})]:
            speed = cpp[fastest][length]["decode_ms"] / decode(name, length)
            lines.append(f"- {name} vs the fastest llama.cpp setting at {length:,} ({fastest}): "
                         f"{speed:.2f}x its tokens/s")  # fmt: skip
    return lines


def write_samples(out: Path) -> str:
    """Greedy answers to bench_quality's chat prompts by float32, float32 with bfloat16 GEMMs
    and int8 weights, a table in out/bench_cpu_samples.md (issue 19's quality bar: samples side
    by side)."""
    names = ("float32", "float32, bfloat16 GEMMs", "int8")
    answers = []
    for name in names:
        dtype, overrides = VARIANTS[name]
        model, tokenizer = load_model(DEFAULT_MODEL, dtype=dtype, progress=False, **overrides)
        answers.append(chat_samples(model, tokenizer, max_tokens=48))
    rows = [f"| {question} | " + " | ".join(texts) + " |"
            for question, *texts in zip(CHATS, *answers, strict=True)]  # fmt: skip
    header = ["| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    table = "\n".join([*header, *rows])
    command = "`.venv/bin/python benchmarks/bench_cpu.py --samples` (48 tokens at most)"
    text = f"# Greedy chat answers, {DEFAULT_MODEL}, by weight format\n\n{command}\n\n{table}\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cpu_samples.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--rounds", type=int, default=6, help="decode: rounds of 4 steps each")
    parser.add_argument("--llamacpp-python", type=Path,
                        default=Path("/work/llamacpp-venv/bin/python"))  # fmt: skip
    parser.add_argument("--decode-tokens", type=int, default=32, help="llama.cpp decode steps")
    parser.add_argument("--llamacpp-contexts", type=int, nargs="+",
                        default=list(LLAMACPP_CONTEXTS),
                        help="llama.cpp's lengths (a 32K prompt takes it ~16 minutes)")  # fmt: skip
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        metavar="NAME", help="lln-serve's variants (default: all)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small contexts, smoke test")
    parser.add_argument("--samples", action="store_true", help="only chat answers, f32 / int8")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    if args.samples:
        print(write_samples(args.out))
        return
    contexts = [256, 1024] if args.quick else args.contexts
    cpp_contexts = contexts if args.quick else args.llamacpp_contexts
    rounds = 2 if args.quick else args.rounds
    lln = run_lln(contexts, rounds, args.variants)
    cpp = run_llamacpp(args.llamacpp_python, torch.get_num_threads(), cpp_contexts,
                       8 if args.quick else args.decode_tokens)  # fmt: skip
    print(report(lln, cpp, contexts, args.out))


if __name__ == "__main__":
    main()
