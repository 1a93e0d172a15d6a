"""Reference CPU timings from llama.cpp (via llama-cpp-python) at batch 1.

For each context length L it builds a fresh llama.cpp context
(n_ctx = L + decode tokens + margin) and measures:

* prefill_tok_s: L / wall time of evaluating a prompt of exactly L token ids,
  drawn at random (seeded) from the model's vocabulary, in n_batch chunks;
* decode_ms: median wall time of one single-token ``Llama.eval`` step while the
  context holds ~L tokens, over ``--decode-tokens`` greedy steps. The greedy
  pick (llama.cpp's C sampler) runs outside the timed region, so sampling
  overhead is excluded.

A short warm-up evaluation runs (and is discarded) before each prefill.
One JSON object per context length is printed to stdout.

Run with the separate venv that has llama-cpp-python, e.g.::

    /work/llamacpp-venv/bin/python benchmarks/llamacpp_runner.py \
        --gguf model.gguf --contexts 256 1024 4096 --threads 2 --decode-tokens 32

Only the standard library and ``llama_cpp`` are imported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import llama_cpp
from llama_cpp import Llama

CTX_MARGIN = 64
KV_TYPES = {"f16": 1, "q8_0": 8}  # ggml_type values
WARMUP_TOKENS = 16


def _eval_synced(llm: Llama, tokens: list[int]) -> float:
    """Evaluate ``tokens`` and return the elapsed wall time in seconds."""
    start = time.perf_counter()
    llm.eval(tokens)
    llama_cpp.llama_synchronize(llm.ctx)
    return time.perf_counter() - start


def measure(
    gguf: str,
    context: int,
    threads: int,
    decode_tokens: int,
    n_batch: int,
    flash_attn: bool,
    seed: int,
    kv_type: str = "f16",
) -> dict[str, object]:
    """Measure prefill throughput and decode latency at one context length."""
    llm = Llama(
        model_path=gguf,
        n_ctx=context + decode_tokens + CTX_MARGIN,
        n_batch=n_batch,
        n_ubatch=n_batch,
        n_threads=threads,
        n_threads_batch=threads,
        flash_attn=flash_attn,
        type_k=KV_TYPES[kv_type],
        type_v=KV_TYPES[kv_type],
        verbose=False,
    )
    rng = random.Random(seed)
    n_vocab = llm.n_vocab()
    prompt = [rng.randrange(n_vocab) for _ in range(context)]

    # Warm-up (threadpool, graph allocation), then clear the KV cache.
    llm.eval(prompt[:WARMUP_TOKENS])
    llm.reset()

    prefill_s = _eval_synced(llm, prompt)

    sampler = llama_cpp.llama_sampler_init_greedy()
    try:
        step_s = []
        token = llama_cpp.llama_sampler_sample(sampler, llm.ctx, -1)
        for _ in range(decode_tokens):
            step_s.append(_eval_synced(llm, [token]))
            token = llama_cpp.llama_sampler_sample(sampler, llm.ctx, -1)
    finally:
        llama_cpp.llama_sampler_free(sampler)
        llm.close()

    return {
        "gguf": os.path.basename(gguf),
        "context": context,
        "threads": threads,
        "prefill_tok_s": round(context / prefill_s, 2),
        "decode_ms": round(statistics.median(step_s) * 1e3, 3),
        "flash_attn": flash_attn,
        "kv_type": kv_type,
        "llama_cpp_python": llama_cpp.__version__,
    }


def main() -> None:
    """Parse arguments and print one JSON line per context length."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, help="path to a GGUF model file")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 16384, 32768])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--n-batch", type=int, default=512, help="n_batch = n_ubatch")
    parser.add_argument(
        "--flash-attn",
        action="store_true",
        help="enable flash attention (llama-cpp-python's default is off)",
    )
    parser.add_argument("--kv-type", choices=list(KV_TYPES), default="f16",
                        help="the KV cache's type (q8_0 needs --flash-attn for V)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    for context in args.contexts:
        result = measure(
            args.gguf,
            context,
            args.threads,
            args.decode_tokens,
            args.n_batch,
            args.flash_attn,
            args.seed,
            args.kv_type,
        )
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
