"""Tool-calling benchmark: BFCL (Berkeley Function Calling Leaderboard) cases through the
OpenAI endpoint, and what tools cost per decode step.

    .venv/bin/pip download --no-deps bfcl-eval==2026.3.23 -d /tmp/bfcl
    .venv/bin/python benchmarks/bench_tools.py --bfcl /tmp/bfcl/bfcl_eval-2026.3.23-py3-none-any.whl

Accuracy: the first --per-category cases of BFCL's simple (Python), multiple and parallel
categories (the package's own data, read from its wheel: installing bfcl-eval itself pins
numpy 1.26 and pulls vLLM-era dependencies), sent to `lln-serve serve` (started here, or
--base-url) with tool_choice auto (parallel_tool_calls for the parallel category), greedy,
at most 256 tokens. Beside it the softmax teacher, served by the same engine, template and
grammar: the same checkpoint with a 4,096-token window (every key of these prompts in the
window: the teacher's attention exactly, `teacher_checkpoint`).
A case is right when its calls match the ground truth as BFCL's AST checker does (function
names, every given argument among the allowed values, required ones present, no unknown
ones; parallel calls in any order). Then the same cases with tool_choice required (named, for
a single function): every call must parse and validate against its tool's schema.

Decode cost: 16 sequences decoding together in the engine (no HTTP), the tool grammar of a
required call (the real prompt and grammar, from server/tools.py) against plain chat, seeded
sampling; median ms per decode step while all 16 run, runs interleaved. Results:
benchmarks/results/bench_tools.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import jsonschema

from models.registry import DEFAULT_MODEL

CATEGORIES = {"simple": "simple_python", "multiple": "multiple", "parallel": "parallel"}
TYPES = {"dict": "object", "float": "number", "tuple": "array", "any": None}


# ---- BFCL data ---------------------------------------------------------------------------------


def read_bfcl(source: Path, category: str) -> tuple[list[dict], dict[str, list]]:
    """(cases, ground truth by id) of a category, from the wheel or an unpacked package."""
    names = [f"bfcl_eval/data/BFCL_v4_{category}.json",
             f"bfcl_eval/data/possible_answer/BFCL_v4_{category}.json"]  # fmt: skip
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            texts = [wheel.read(name).decode() for name in names]
    else:
        texts = [(source / name).read_text() for name in names]
    cases = [json.loads(line) for line in texts[0].splitlines() if line.strip()]
    answers = {a["id"]: a["ground_truth"] for a in map(json.loads, texts[1].splitlines())}
    return cases, answers


def openai_schema(node):
    """BFCL's Python-flavoured types as JSON Schema (as its OpenAI handler converts them)."""
    if isinstance(node, list):
        return [openai_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    result = {}
    for key, value in node.items():
        if key == "type" and value in TYPES:
            if TYPES[value] is not None:
                result[key] = TYPES[value]
        elif key == "properties":
            result[key] = {name: openai_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "anyOf", "oneOf"):
            result[key] = openai_schema(value)
        elif key != "optional":
            result[key] = value
    return result


def tools_of(case: dict) -> list[dict]:
    return [{"type": "function", "function": {
        "name": f["name"].replace(".", "_"), "description": f.get("description", ""),
        "parameters": openai_schema(f["parameters"])}} for f in case["function"]]  # fmt: skip


# ---- BFCL's AST check, simplified --------------------------------------------------------------


def _same(value, allowed) -> bool:
    if isinstance(value, str) and isinstance(allowed, str):
        return value.strip().lower() == allowed.strip().lower()
    if isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed
    if isinstance(value, int | float) and isinstance(allowed, int | float):
        return float(value) == float(allowed)
    if isinstance(value, list) and isinstance(allowed, list):
        return len(value) == len(allowed) and all(map(_same, value, allowed))
    if isinstance(value, dict) and isinstance(allowed, dict):
        return value.keys() == allowed.keys() and all(_same(value[k], allowed[k]) for k in value)
    return value == allowed


def call_matches(call: tuple[str, dict], truth: dict, functions: dict) -> bool:
    name, arguments = call
    ((expected, params),) = truth.items()
    if name != expected.replace(".", "_"):
        return False
    known = functions[expected]["parameters"].get("properties", {})
    if any(key not in known for key in arguments):
        return False
    for key, allowed in params.items():
        if key not in arguments:
            if "" not in allowed:  # "" marks an optional argument
                return False
        elif not any(_same(arguments[key], option) for option in allowed if option != ""):
            return False
    return True


def case_right(calls: list[tuple[str, dict]], truths: list[dict], functions: dict) -> bool:
    if len(calls) != len(truths):
        return False
    left = list(calls)
    for truth in truths:  # parallel calls in any order
        match = next((c for c in left if call_matches(c, truth, functions)), None)
        if match is None:
            return False
        left.remove(match)
    return True


# ---- the server --------------------------------------------------------------------------------


def teacher_checkpoint() -> Path:
    """The default model's checkpoint with a 4,096-token window and float32 keys: below 4,096
    tokens every key is in the window, so this is exactly the softmax teacher (logits within
    1e-4 of `attention_kernel="softmax"`) served by the same engine, template and grammar."""
    from models.registry import lln_home, resolve

    source = resolve(DEFAULT_MODEL)
    target = lln_home() / "bench" / "smollm2-135m-teacher-window"
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        link = target / item.name
        if item.name != "config.json" and not link.exists():
            link.symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    config.update(local_size=4096, kv_cache_dtype="auto")
    (target / "config.json").write_text(json.dumps(config, indent=1))
    return target


def start_server(port: int, model: str) -> subprocess.Popen:
    env = {**os.environ, "LLN_SERVE_MAX_NUM_SEQS": "16"}
    command = [sys.executable, "-m", "server.cli", "serve", "--model", model,
               "--served-model-name", DEFAULT_MODEL, "--port", str(port)]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"the server of {model} exited ({process.returncode})")
        time.sleep(1)
    process.kill()
    raise SystemExit("the server did not become healthy")


async def ask(client: httpx.AsyncClient, base_url: str, case: dict, choice, parallel: bool):
    body = {"model": DEFAULT_MODEL, "messages": case["question"][0], "tools": tools_of(case),
            "tool_choice": choice, "temperature": 0, "max_tokens": 256,
            "parallel_tool_calls": parallel}  # fmt: skip
    response = await client.post(f"{base_url}/chat/completions", json=body, timeout=1800)
    response.raise_for_status()
    return response.json()["choices"][0]


def parsed_calls(choice: dict, tools: list[dict]) -> tuple[list, int, int]:
    """(name, arguments) of the calls, and how many of them parse and validate, of how many."""
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    calls, valid = [], 0
    for call in choice["message"].get("tool_calls") or []:
        name = call["function"]["name"]
        try:
            arguments = json.loads(call["function"]["arguments"])
            jsonschema.validate(arguments, schemas[name])
            valid += 1
        except (ValueError, KeyError, jsonschema.ValidationError):
            arguments = {}
        calls.append((name, arguments))
    return calls, valid, len(calls)


async def run_category(base_url: str, source: Path, label: str, count: int, forced: bool):
    cases, answers = read_bfcl(source, CATEGORIES[label])
    cases = cases[:count]
    parallel = label == "parallel"

    def choice_of(case):
        if not forced:
            return "auto"
        if len(case["function"]) == 1:
            return {"type": "function", "function": {"name": tools_of(case)[0]["function"]["name"]}}
        return "required"

    limits = httpx.Limits(max_connections=16)
    async with httpx.AsyncClient(limits=limits) as client:
        replies = await asyncio.gather(
            *(ask(client, base_url, c, choice_of(c), parallel) for c in cases)
        )
    right = valid = total = called = cut = 0
    for case, reply in zip(cases, replies, strict=True):
        calls, ok, n = parsed_calls(reply, tools_of(case))
        valid, total, called = valid + ok, total + n, called + bool(n)
        cut += reply["finish_reason"] == "length"
        functions = {f["name"]: f for f in case["function"]}
        right += case_right(calls, answers[case["id"]], functions)
    return {"cases": len(cases), "right": right, "valid": valid, "calls": total,
            "answered_by_call": called, "cut": cut}  # fmt: skip


def bfcl_runs(base_url: str, args) -> dict[tuple[str, bool], dict]:
    results = {}
    for forced in (False, True):
        for label in CATEGORIES:
            began = time.perf_counter()
            r = asyncio.run(run_category(base_url, args.bfcl, label, args.per_category, forced))
            r["seconds"] = time.perf_counter() - began
            results[label, forced] = r
            print(label, "forced" if forced else "auto", r, flush=True)
    return results


def served_runs(model: str, args) -> dict[tuple[str, bool], dict]:
    process = start_server(args.port, model)
    try:
        return bfcl_runs(f"http://127.0.0.1:{args.port}/v1", args)
    finally:
        process.terminate()
        process.wait(timeout=60)


def _share(part: int, whole: int) -> str:
    return f"{part}/{whole} ({100 * part / max(whole, 1):.0f}%)"


def bfcl_report(args) -> list[str]:
    models = {"LLN (default)": DEFAULT_MODEL}
    if args.teacher:
        models["softmax teacher"] = str(teacher_checkpoint())
    if args.base_url is not None:
        return bfcl_table({"server at --base-url": bfcl_runs(args.base_url, args)})
    return bfcl_table({name: served_runs(model, args) for name, model in models.items()})


def bfcl_table(results: dict[str, dict[tuple[str, bool], dict]]) -> list[str]:
    """One row per category and choice; each cell gives every model's figure, " / " apart."""
    names = list(results)
    columns = {
        "right (AST)": lambda r: _share(r["right"], r["cases"]),
        "replies with calls": lambda r: str(r["answered_by_call"]),
        "calls that parse and validate": lambda r: _share(r["valid"], r["calls"]),
        "cut at max_tokens": lambda r: str(r["cut"]),
    }
    lines = [f"Cells: {' / '.join(names)}.", "",
             "| category | tool_choice | cases | " + " | ".join(columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]  # fmt: skip
    for forced in (False, True):
        for label in CATEGORIES:
            rows = [results[n].get((label, forced)) for n in names]
            cells = [" / ".join(f(r) if r else "not run" for r in rows) for f in columns.values()]
            cases = next(r["cases"] for r in rows if r)
            choice = "named / required" if forced else "auto"
            lines.append(f"| {label} | {choice} | {cases} | " + " | ".join(cells) + " |")
    return lines


# ---- decode cost -------------------------------------------------------------------------------

NOTE_TOOL = [{"type": "function", "function": {  # long arguments: every sequence runs to the end
    "name": "write_note", "description": "Save a note",
    "parameters": {"type": "object", "properties": {
        "title": {"type": "string"}, "text": {"type": "string", "minLength": 2000}},
        "required": ["title", "text"]}}}]  # fmt: skip


def decode_step_ms(engine, tools: bool, count: int, max_tokens: int, tag: str) -> float:
    from server.protocol import ChatCompletionRequest
    from server.request import SamplingParams
    from server.tools import plan_chat

    for i in range(count):
        body = ChatCompletionRequest.model_validate({
            "model": DEFAULT_MODEL, "messages": [{"role": "user", "content": f"Note {i}: tea."}],
            **({"tools": NOTE_TOOL, "tool_choice": "required"} if tools else {}),
        })  # fmt: skip
        plan = plan_chat(body, engine.tokenizer)
        ids = engine.tokenizer.apply_chat_template(
            plan.messages, add_generation_prompt=True, tokenize=True, tools=plan.tools
        )
        ids = list(ids["input_ids"] if hasattr(ids, "input_ids") else ids)
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens,
                                ignore_eos=not tools, guided=plan.guided)  # fmt: skip
        engine.add_request(f"{tag}-{i}", ids, params)
    steps = []
    while engine.has_unfinished():
        full = (
            engine.num_running == count
            and not engine.num_waiting
            and all(r.is_prefill_done for r in engine.scheduler.running)
        )
        began = time.perf_counter()
        engine.step()
        if full:
            steps.append(time.perf_counter() - began)
    return statistics.median(steps) * 1e3


def decode_report(args) -> list[str]:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_engine import make_engine

    engine = make_engine(16, "cpu")
    decode_step_ms(engine, True, 2, 8, "warm-tools")  # compiles; builds the vocabulary view
    decode_step_ms(engine, False, 2, 8, "warm-plain")
    times = {False: [], True: []}
    for run in range(args.rounds):
        for tools in (False, True):
            times[tools].append(
                decode_step_ms(engine, tools, 16, args.max_tokens, f"r{run}{tools}")
            )
    plain, tooled = statistics.median(times[False]), statistics.median(times[True])
    return [
        "| 16 sequences | ms per decode step (median of runs) | decode tok/s | runs (ms) |",
        "|---|---|---|---|",
        f"| plain chat | {plain:.1f} | {16e3 / plain:.1f} | "
        f"{', '.join(f'{t:.1f}' for t in times[False])} |",
        f"| tools (grammar of a required call) | {tooled:.1f} | {16e3 / tooled:.1f} | "
        f"{', '.join(f'{t:.1f}' for t in times[True])} |",
        "",
        f"Tools are {tooled / plain:.3f}x the plain step time (goal: at most 1.1x).",
    ]


BFCL_HOW = [
    "The first cases of each category, greedy, at most 256 tokens a reply. *right*: the calls",
    "match BFCL's ground truth (its AST check: names, allowed values, required arguments, any",
    "order); *calls that validate*: complete calls whose arguments parse and follow their",
    "tool's schema; *cut at max_tokens*: replies still open at 256 tokens (a small model",
    "greedily repeating a call or a string), which carry no call. The softmax teacher is the",
    "same weights with every key in a 4,096-token window, served by the same engine, template",
    "and grammar.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bfcl", type=Path, help="bfcl-eval's wheel (or unpacked package)")
    parser.add_argument("--per-category", type=int, default=20)
    parser.add_argument("--base-url", help="a running server's /v1 (default: start one)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--teacher", action=argparse.BooleanOptionalAction, default=True,
                        help="also serve the softmax teacher (a 4,096-token window)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="decode runs of each kind")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--skip-bfcl", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    command = "`.venv/bin/python benchmarks/bench_tools.py " + " ".join(sys.argv[1:]) + "`"
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text = [f"# Tool calling, {DEFAULT_MODEL}, CPU (2 cores)", "", f"{command} on {stamp}.", ""]
    if not args.skip_bfcl:
        if args.bfcl is None:
            raise SystemExit("--bfcl: the path of bfcl-eval's wheel (see the docstring)")
        text += ["## BFCL (simple, multiple, parallel)", "", *BFCL_HOW, "", *bfcl_report(args), ""]
    if not args.skip_decode:
        text += ["## Decode cost of tools", "", *decode_report(args), ""]
    print("\n".join(text))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_tools.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
