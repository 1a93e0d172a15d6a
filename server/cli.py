"""`lln-serve` command line: serve | convert | generate | distill | analyze."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from models.configuration_lln import ATTENTION_KERNELS as KERNELS
from models.configuration_lln import FAR_POSITIONS, FEATURE_MAPS
from server.config import DTYPES, GEMM_DTYPES, EngineConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lln-serve", description="Long-context inference on LLN attention."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_serve(commands.add_parser("serve", help="start the OpenAI-compatible HTTP server"))
    _add_convert(commands.add_parser("convert", help="convert a softmax checkpoint to LLN"))
    _add_generate(commands.add_parser("generate", help="generate text, streamed to the terminal"))
    _add_distill(commands.add_parser("distill", help="distil the LLN parameters from softmax"))
    _add_analyze(commands.add_parser("analyze", help="the paper's instruments, per layer"))
    return parser


# (flag, type, default, help); each flag also reads LLN_SERVE_<FLAG> from the environment
SERVE_OPTIONS = [
    ("--model", str, "smollm2-135m-lln", "registry name, checkpoint directory or hub id"),
    ("--served-model-name", str, None, "model name in the API (default: --model)"),
    ("--host", str, "127.0.0.1", "interface to listen on"),
    ("--port", int, 8000, "TCP port"),
    (
        "--api-key",
        str,
        None,
        "require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize",
    ),
    (
        "--api-keys-file",
        str,
        None,
        "many keys: one per line, 'KEY [TENANT] [max_concurrent=N] [tokens_per_minute=N]'; "
        "each tenant's sessions and cached prefixes are its own; read again on SIGHUP "
        "(docs/security.md)",
    ),
    ("--max-tenant-labels", int, 100, "tenants with their own label in /metrics (rest: other)"),
    ("--cors-origins", str, "", "comma-separated allowed CORS origins ('*' for any)"),
    ("--max-body-bytes", int, 4 * 2**20, "largest request body"),
    (
        "--shutdown-timeout",
        float,
        30.0,
        "on SIGINT/SIGTERM, seconds open requests may take to finish; then they end with an "
        "error (503, or an error event in a stream) and the process exits",
    ),
    ("--max-num-seqs", int, 8, "state slots: sequences running at once"),
    ("--max-num-batched-tokens", int, 1024, "tokens per engine step"),
    ("--max-waiting", int, 256, "queued requests beyond the slots (more get 503)"),
    ("--prefill-chunk-size", int, 512, "longest prefill chunk per sequence and step"),
    ("--device", str, "cpu", "cpu or cuda[:N]"),
    (
        "--threads",
        int,
        None,
        "CPU threads for the model's math (default: $OMP_NUM_THREADS, else the cores this "
        "process may use); fewer than the cores keeps decode steady beside other busy processes",
    ),
    (
        "--dtype",
        str,
        "auto",
        "weights: auto (bfloat16 on CUDA; on a CPU int8 where the AVX-512 VNNI kernel runs, "
        "else float32), float32, bfloat16, float16, int8 (weight-only) or int4 (weight-only, "
        "CPU: 4 bits in groups of 32, the default model's own Q4_1 grid, LM head int8); "
        "states stay float32",
    ),
    (
        "--gemm-dtype",
        str,
        "auto",
        "float32 weights: eager matmuls of 64+ rows (prefill chunks) in float32 or bfloat16; "
        "auto: bfloat16 on a CPU with bfloat16 units; decode stays float32",
    ),
    ("--prefix-cache-mb", int, 256, "prefix-cache budget, MiB (0 disables)"),
    ("--session-mb", int, 256, "session-state budget, MiB (0 disables)"),
    ("--session-ttl", float, 3600.0, "seconds an idle session is kept"),
    ("--compile", int, 1, "compile decode steps (1) or run them eagerly (0)"),
    ("--enforce-eager", bool, False, "CUDA: run decode steps eagerly, without CUDA graphs"),
    (
        "--deterministic",
        bool,
        None,
        "a request's tokens do not depend on the other requests: prompts split and prefilled "
        "on their own, decode rows through one arithmetic at any batch size (default: on "
        "where it costs nothing measured, int8 weights on a CPU without AMX)",
    ),
    ("--max-model-len", int, 1 << 20, "most tokens of prompt + generation per sequence"),
    ("--default-max-tokens", int, 4096, "generation bound of requests without max_tokens"),
    (
        "--state-store",
        str,
        "memory",
        "where session states live: memory (this process) or "
        "redis://[:password@]host:port/db or rediss://... for TLS (shared by replicas, kept "
        "across restarts)",
    ),
    (
        "--state-store-password-file",
        str,
        None,
        "file holding the Redis password (a mounted secret; the URL's password wins)",
    ),
    ("--state-store-ca-cert", str, None, "rediss://: CA file that verifies Redis's certificate"),
    ("--state-store-cert", str, None, "rediss://: this client's certificate (with --...-key)"),
    ("--state-store-key", str, None, "rediss://: this client's private key"),
    (
        "--share-prefix-states",
        bool,
        False,
        "with a Redis state store, share prefix-cache states between replicas too",
    ),
    (
        "--session-lock-ttl",
        float,
        30.0,
        "seconds a session in use stays locked in Redis "
        "without a refresh (a crashed replica's lock frees itself after it)",
    ),
]


NO_UI_ENV = "LLN_SERVE_NO_UI"
SWITCH_VALUES = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def _add_serve(parser: argparse.ArgumentParser) -> None:
    for flag, kind, default, text in SERVE_OPTIONS:
        env = "LLN_SERVE_" + flag[2:].upper().replace("-", "_")
        value = os.environ.get(env, default)
        if kind is bool:  # --flag / --no-flag; the variable takes 1/0, true/false
            if value is not None:  # None: neither given, the engine decides
                value = str(value).strip().lower() in ("1", "true", "yes", "on")
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value,
                                help=f"{text} [env {env}]")  # fmt: skip
            continue
        parser.add_argument(flag, type=kind, default=value, help=f"{text} [env {env}]")
    # a switch: the flag sets it, the environment variable takes 1/0 (checked in run_serve)
    parser.add_argument(
        "--no-ui", action="store_const", const="1", default=os.environ.get(NO_UI_ENV, "0"),
        help=f"do not serve the web playground at / (it answers 404) [env {NO_UI_ENV}=1]",
    )  # fmt: skip


def _add_analyze(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-lln", help="registry name or path")
    parser.add_argument("--text", type=Path, help="text file (default: the evaluation text)")
    parser.add_argument("--out", type=Path, required=True, help="directory for table and plot")
    parser.add_argument("--tokens", type=_positive_int, default=256, help="window length")


def _add_distill(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-lln", help="registry name or path")
    parser.add_argument("--out", type=Path, required=True, help="output (and checkpoint) dir")
    parser.add_argument("--text", type=Path, help="training text (default: CPython's docs)")
    parser.add_argument("--tokens", type=_positive_int, default=16384, help="training tokens")
    parser.add_argument(
        "--stage", choices=("1", "select", "2"), default="1",
        help="1: attention transfer, layer by layer; select: keep each layer's LLN part only "
        "where it lowers the KL to the teacher; 2: KL to the teacher's next-token logits",
    )  # fmt: skip
    parser.add_argument("--seq-len", type=_positive_int, default=4096, help="training sequences")
    parser.add_argument("--steps-per-layer", type=_positive_int, default=60, help="stage 1")
    parser.add_argument("--steps", type=_positive_int, default=40, help="stage 2")
    parser.add_argument("--lr", type=float, default=None, help="default 0.05 (1), 0.01 (2)")
    parser.add_argument("--max-minutes", type=float, help="stage 2: stop early after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--feature-map", choices=FEATURE_MAPS,
        help="switch the model's LLN features first: linear adds a per-head D x D map before the "
        "exponential (at identity, so the model is unchanged until trained) [default: keep]",
    )  # fmt: skip


def _add_convert(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="HF checkpoint directory, .gguf file, or hub id")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--kernel", choices=KERNELS, default="lln_diag")
    parser.add_argument("--calib-text", type=Path, help="calibration text file (UTF-8)")
    parser.add_argument("--calib-tokens", type=_positive_int, default=4096)
    parser.add_argument("--local-kind", choices=("window", "block"), default="window")
    parser.add_argument("--local-size", type=_positive_int, default=64)
    parser.add_argument("--num-sinks", type=_non_negative_int, default=4)
    parser.add_argument("--combine", choices=("joint", "average"), default="joint")
    parser.add_argument(
        "--sparse-cache", type=_non_negative_int, default=0,
        help="exact key/value pairs kept beyond the window, chosen by surprise (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--sparse-span", type=_non_negative_int, default=8,
        help="a token's score is the largest surprise within this many tokens either side",
    )  # fmt: skip
    parser.add_argument(
        "--kv-cache-dtype", choices=("auto", "bfloat16"), default="auto",
        help="storage of the window's and sparse cache's keys/values (auto: the state's float32)",
    )  # fmt: skip
    parser.add_argument(
        "--far-positions", choices=FAR_POSITIONS, default="fixed",
        help="rotary positions of keys past the window (sinks, sparse cache, LLN): 'fixed' reads "
        "them all at --far-distance (usable past the trained length), 'grouped' as fixed but the "
        "sparse cache's pairs in order, --far-group tokens a position, 'original' where written",
    )  # fmt: skip
    parser.add_argument(
        "--far-distance", type=_non_negative_int, default=1024,
        help="the rotary distance of far keys with --far-positions fixed or grouped",
    )  # fmt: skip
    parser.add_argument(
        "--far-group", type=_positive_int, default=8,
        help="--far-positions grouped: text tokens per rotary position of the sparse cache "
        "(doubled as the context grows, to stay within --far-max-distance)",
    )  # fmt: skip
    parser.add_argument(
        "--far-max-distance", type=_positive_int, default=4096,
        help="--far-positions grouped: the largest rotary distance at which a sparse-cache "
        "pair is read",
    )  # fmt: skip


def _add_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-lln", help="registry name or path")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=_positive_int, default=64)
    parser.add_argument("--chat", action="store_true", help="apply the chat template")
    parser.add_argument("--kernel", choices=KERNELS, help="run the weights with this kernel")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto",
        help="weights, as for serve (auto: int8 on a CPU with the VNNI kernel, else float32; "
        "int4: 4 bits in groups of 32)",
    )  # fmt: skip
    parser.add_argument(
        "--gemm-dtype", choices=GEMM_DTYPES, default="auto",
        help="float32 weights: dtype of eager matmuls of 64+ rows, i.e. prefill (auto: bfloat16 "
        "on a CPU with bfloat16 units)",
    )  # fmt: skip
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=_non_negative_int, default=0)
    parser.add_argument("--seed", type=int, default=0)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def run_convert(args: argparse.Namespace) -> int:
    from models.convert import convert

    calib_text = None
    if args.calib_text is not None:
        if not args.calib_text.is_file():
            return _fail(f"calibration text not found: {args.calib_text}")
        calib_text = args.calib_text.read_text(encoding="utf-8")
    local = {}
    if args.kernel == "lln_diag":
        local = dict(
            local_kind=args.local_kind,
            local_size=args.local_size,
            num_sinks=args.num_sinks,
            combine=args.combine,
            kv_cache_dtype=args.kv_cache_dtype,
            far_positions=args.far_positions,
            far_distance=args.far_distance,
            far_group=args.far_group,
            far_max_distance=args.far_max_distance,
        )
        if args.sparse_cache:
            if args.combine != "joint" or args.local_kind != "window":
                return _fail("--sparse-cache needs --combine joint and --local-kind window")
            if args.sparse_span >= args.local_size:
                return _fail("--sparse-span must be smaller than --local-size")
            local.update(sparse_cache_size=args.sparse_cache, sparse_span=args.sparse_span)
    elif args.sparse_cache or args.kv_cache_dtype != "auto":
        return _fail("--sparse-cache and --kv-cache-dtype need --kernel lln_diag")
    out = convert(
        args.src,
        args.out,
        kernel=args.kernel,
        calib_text=calib_text,
        calib_tokens=args.calib_tokens,
        **local,
    )
    print(f"saved {args.kernel} model to {out}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    from models.registry import load_model

    if args.temperature < 0 or not 0 < args.top_p <= 1:
        return _fail("need temperature >= 0 and 0 < top-p <= 1")
    from models.quantize import resolve_gemm_dtype

    weight_dtype = EngineConfig(dtype=args.dtype).weight_dtype
    model, tokenizer = load_model(
        args.model,
        kernel=args.kernel,
        dtype=getattr(torch, weight_dtype),
        gemm_dtype=resolve_gemm_dtype(args.gemm_dtype, weight_dtype, "cpu"),
    )
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    ids = tokenizer(text, return_tensors="pt").input_ids
    torch.manual_seed(args.seed)
    sampling = dict(do_sample=False)
    if args.temperature > 0:
        sampling = dict(
            do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k
        )
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if ids.shape[1] > PROGRESS_MIN_TOKENS:
        sampling["past_key_values"], bar = _prefill_with_progress(model, ids)
        streamer = _PrefillBarStreamer(streamer, bar)
    model.generate(
        ids,
        max_new_tokens=args.max_tokens,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        **sampling,
    )
    return 0


PROGRESS_MIN_TOKENS = 2048  # longer prompts show a prefill progress bar on stderr
PROGRESS_CHUNK = 512  # tokens per prefill forward (and bar update)


def _prefill_with_progress(model, ids):
    """(LLNCache, tqdm bar): every prompt token but the last, prefilled in chunks with a bar
    on stderr; generate() prefills the last one from that cache and samples from it."""
    import torch
    from tqdm import tqdm

    from models.cache import LLNCache

    total = ids.shape[1]
    # every chunk is drawn: on a real model they are seconds apart
    bar = tqdm(total=total, desc="prefill", unit="tok", file=sys.stderr, dynamic_ncols=True,
               mininterval=0, miniters=1)  # fmt: skip
    cache = LLNCache(len(model.model.layers))
    with torch.no_grad():
        for start in range(0, total - 1, PROGRESS_CHUNK):
            chunk = ids[:, start : min(start + PROGRESS_CHUNK, total - 1)]
            model(input_ids=chunk, past_key_values=cache, use_cache=True, logits_to_keep=1)
            bar.update(chunk.shape[1])
    return cache, bar


class _PrefillBarStreamer:
    """generate()'s streamer around a TextStreamer: its first put is the prompt, the next the
    first token, before which the prefill bar (stderr) is completed and closed."""

    def __init__(self, streamer, bar) -> None:
        self.streamer, self.bar = streamer, bar
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self._close_bar()
        self.prompt_seen = True
        self.streamer.put(value)

    def end(self) -> None:
        self._close_bar()
        self.streamer.end()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.update(self.bar.total - self.bar.n)
            self.bar.close()
            self.bar = None


def run_distill(args: argparse.Namespace) -> int:
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from models.distill import (
        DistillConfig,
        LogitConfig,
        default_training_text,
        distill,
        distill_logits,
        lln_parameters,
        select_layers,
    )
    from models.registry import from_checkpoint, resolve

    if args.text is not None and not args.text.is_file():
        return _fail(f"training text not found: {args.text}")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        return _fail(f"--device {args.device}: {error}")
    if device.type not in ("cpu", "cuda"):
        return _fail(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return _fail(f"--device {args.device}: no CUDA device is available")
    if args.max_minutes is not None and args.max_minutes <= 0:
        return _fail("--max-minutes must be positive")
    path = resolve(args.model)
    overrides = {} if args.feature_map is None else {"feature_map": args.feature_map}
    model = from_checkpoint(path, **overrides).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = args.text.read_text(encoding="utf-8") if args.text else default_training_text()
    ids = torch.tensor(tokenizer(text)["input_ids"][: args.tokens])
    checkpoint = args.out / "checkpoint"
    try:
        if args.stage == "1":
            lr = 0.05 if args.lr is None else args.lr
            config = DistillConfig(args.steps_per_layer, lr, args.seq_len, args.seed)
            report = distill(model, ids, config, checkpoint=checkpoint)
        elif args.stage == "select":
            report = select_layers(model, ids, seq_len=args.seq_len)
            checkpoint.mkdir(parents=True, exist_ok=True)
            (checkpoint / "select.json").write_text(json.dumps(report.to_json(), indent=1))
        else:
            lr = 0.01 if args.lr is None else args.lr
            budget = None if args.max_minutes is None else args.max_minutes * 60
            config = LogitConfig(args.steps, lr, args.seq_len, args.seed, max_seconds=budget)
            report = distill_logits(model, ids, config, checkpoint=checkpoint)
    except ValueError as error:
        return _fail(str(error))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    save_file(lln_parameters(model), args.out / "lln_params.safetensors")  # what ships
    if args.stage == "1":
        for layer in report.layers:
            print(f"layer {layer.layer:2d}: loss {layer.loss_before:.4f} -> {layer.loss_after:.4f}")
    elif args.stage == "select":
        print(f"LLN part switched off in layers {report.disabled}")
        print(f"KL to the teacher: sinks + window alone {report.kl_local:.4f}, every layer's LLN "
              f"{report.kl_all:.4f}, selected {report.kl_selected:.4f}")  # fmt: skip
    else:
        print(f"KL to the teacher: {report.kl_before:.4f} -> {report.kl_after:.4f} "
              f"({len(report.losses)} steps, {report.seconds:.0f} s)")  # fmt: skip
    print(f"saved the distilled model to {args.out}")
    return 0


def run_analyze(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from models.analyze import analyze
    from models.evaluate import evaluation_text
    from models.registry import from_checkpoint, resolve

    if args.text is not None and not args.text.is_file():
        return _fail(f"text not found: {args.text}")
    path = resolve(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = args.text.read_text(encoding="utf-8") if args.text else evaluation_text()
    ids = torch.tensor(tokenizer(text)["input_ids"][: args.tokens])
    if ids.numel() < 2:
        return _fail("the text needs at least 2 tokens")
    rows = analyze(from_checkpoint(path), ids, args.out)
    print(f"wrote {args.out / 'analysis.md'} and {args.out / 'analysis.png'} ({len(rows)} layers)")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from server.config import EngineConfig, ServerConfig
    from server.serve import serve

    try:
        engine_config = EngineConfig(
            model=args.model,
            max_num_seqs=int(args.max_num_seqs),
            max_num_batched_tokens=int(args.max_num_batched_tokens),
            max_waiting=int(args.max_waiting),
            prefill_chunk_size=int(args.prefill_chunk_size),
            device=args.device,
            dtype=args.dtype,
            gemm_dtype=args.gemm_dtype,
            prefix_cache_bytes=int(args.prefix_cache_mb) * 2**20,
            session_bytes=int(args.session_mb) * 2**20,
            session_ttl_s=float(args.session_ttl),
            compile_decode=bool(int(args.compile)),
            enforce_eager=bool(args.enforce_eager),
            deterministic=args.deterministic,
            max_model_len=int(args.max_model_len),
            default_max_tokens=int(args.default_max_tokens),
            state_store=args.state_store,
            share_prefix_states=bool(args.share_prefix_states),
            session_lock_ttl_s=float(args.session_lock_ttl),
            state_store_password_file=args.state_store_password_file or None,
            state_store_ca_cert=args.state_store_ca_cert or None,
            state_store_cert=args.state_store_cert or None,
            state_store_key=args.state_store_key or None,
            threads=int(args.threads) if args.threads is not None else default_threads(),
        )
        no_ui = SWITCH_VALUES.get(str(args.no_ui).strip().lower())
        if no_ui is None:
            raise ValueError(f"{NO_UI_ENV} must be 1 or 0, got {args.no_ui!r}")
        origins = tuple(o.strip() for o in str(args.cors_origins).split(",") if o.strip())
        server_config = ServerConfig(
            host=args.host,
            port=int(args.port),
            api_key=args.api_key or None,
            api_keys_file=args.api_keys_file or None,
            max_tenant_labels=int(args.max_tenant_labels),
            cors_origins=origins,
            max_body_bytes=int(args.max_body_bytes),
            served_model_name=args.served_model_name,
            ui=not no_ui,
            shutdown_timeout_s=float(args.shutdown_timeout),
        )
    except ValueError as error:
        return _fail(str(error))
    return serve(engine_config, server_config)


def default_threads() -> int:
    """$OMP_NUM_THREADS where set, else the cores this process may run on (its affinity,
    which a container's cpuset narrows; torch's own default counts every core)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) >= 1:
        return int(value)
    return len(os.sched_getaffinity(0))


def _fail(message: str) -> int:
    print(f"lln-serve: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    from models.errors import ConversionError

    run = {
        "convert": run_convert,
        "generate": run_generate,
        "distill": run_distill,
        "analyze": run_analyze,
    }
    try:
        return run[args.command](args)
    except ConversionError as error:
        print(f"lln-serve {args.command}: error: {error}", file=sys.stderr)
        return 1
    except (OSError, ValueError, RuntimeError) as error:  # bad input found deep down
        first_line = (str(error).strip().splitlines() or [""])[0]
        print(f"lln-serve {args.command}: error: {type(error).__name__}: {first_line}",
              file=sys.stderr)  # fmt: skip
        return 1


if __name__ == "__main__":
    sys.exit(main())
