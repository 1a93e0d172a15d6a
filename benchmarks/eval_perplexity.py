"""Perplexity of the default model's variants next to the softmax teacher, on held-out text.

    .venv/bin/python benchmarks/eval_perplexity.py [--windows 1024 4096] [--out benchmarks/results]

Text: /usr/share/common-licenses/GPL-3 (Debian base-files; calibration used Apache-2.0 and
MPL-2.0, distillation CPython's docs). Every window is scored from an empty state.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models.evaluate import EVALUATION_FILE, evaluation_text, perplexity
from models.modeling_lln import LLNForCausalLM
from models.quantize import quantize_int8, use_bf16_gemms
from models.registry import DEFAULT_MODEL, REGISTRY, from_checkpoint, load_model, resolve

_LOCAL = REGISTRY[DEFAULT_MODEL].config
# the default model's weights without its sparse cache, float32 window: revision 6
NO_SPARSE = dict(sparse_cache_size=0, kv_cache_dtype="auto")
WINDOW = f"window {_LOCAL['local_size']} + {_LOCAL['num_sinks']} sinks"
VARIANTS = {
    "softmax teacher": dict(attention_kernel="softmax"),
    "LLN (alpha/beta moment-matched)": dict(attention_kernel="lln", calibrated=True),
    "LLN+Diag paper form (blocks of 64, average 0.5)": dict(
        attention_kernel="lln_diag",
        local_kind="block",
        local_size=64,
        combine="average",
        calibrated=True,
        mix=0.5,
        **NO_SPARSE,
    ),
    f"{WINDOW} only (LLN weight 0)": dict(mix=float("-inf"), **NO_SPARSE),
    f"{WINDOW} + LLN, mix uncalibrated (log-weight 0)": dict(calibrated=True, mix=0.0, **NO_SPARSE),
    f"{WINDOW} + LLN, calibrated mix (before distillation)": dict(calibrated=True, **NO_SPARSE),
    f"{WINDOW} + LLN after distillation (revision 6)": dict(NO_SPARSE),
    f"{DEFAULT_MODEL} (the same + sparse cache of {_LOCAL['sparse_cache_size']})": dict(),
}


def load_variant(path: Path, overrides: dict) -> LLNForCausalLM:
    """The default checkpoint with overrides; every variant keeps the distilled parameters
    except `calibrated=True`, which restores the conversion's calibrated alpha/beta/mix (and a
    count_power of 0); `int8=True` quantizes the weights (`models.quantize`), `bf16_gemms=True`
    runs matmuls over more than 4 rows in bfloat16 (`--gemm-dtype bfloat16`)."""
    overrides = dict(overrides)
    mix = overrides.pop("mix", None)
    calibrated = overrides.pop("calibrated", False)
    int8 = overrides.pop("int8", False)
    bf16_gemms = overrides.pop("bf16_gemms", False)
    model = from_checkpoint(path, **overrides)
    if int8:
        model = quantize_int8(model)
    elif bf16_gemms:
        model = use_bf16_gemms(model)
    if calibrated:
        calibration = json.loads((path / "lln_conversion.json").read_text())["calibration"]
        with torch.no_grad():
            for i, layer in enumerate(model.model.layers):
                for name in ("alpha", "beta", "mix"):
                    if hasattr(layer.self_attn, name):
                        getattr(layer.self_attn, name).copy_(torch.tensor(calibration[name][i]))
                if hasattr(layer.self_attn, "count_power"):  # not calibrated: distillation's
                    layer.self_attn.count_power.zero_()
    if mix is not None:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.mix.fill_(mix)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    path = resolve(DEFAULT_MODEL)
    _, tokenizer = load_model(DEFAULT_MODEL, progress=False)
    ids = torch.tensor(tokenizer(evaluation_text())["input_ids"])
    header = "| variant | " + " | ".join(f"{w} tokens" for w in args.windows) + " |"
    lines = [
        f"# Perplexity of {DEFAULT_MODEL} variants ({EVALUATION_FILE}, {ids.numel()} tokens)",
        "",
        "`.venv/bin/python benchmarks/eval_perplexity.py` on "
        f"{time.strftime('%Y-%m-%d')}, float32, CPU. Windows: non-overlapping, each from an "
        "empty state; the last partial window is dropped.",
        "",
        header,
        "|---|" + "---|" * len(args.windows),
    ]
    for name, overrides in VARIANTS.items():
        model = load_variant(path, overrides)
        scores = [perplexity(model, ids, window=w) for w in args.windows]
        lines.append(f"| {name} | " + " | ".join(f"{s:,.1f}" for s in scores) + " |")
        print(lines[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perplexity.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
