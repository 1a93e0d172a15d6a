"""Softmax checkpoint (HF directory, .gguf file or hub id) -> LLN checkpoint.

Weights map 1:1 (the LLN model names its parameters as transformers' Llama does); the only new
parameters are alpha/beta per layer and KV head (and lln_diag's per-head mix and count_power).
alpha/beta come from calibration: run the softmax model on text, measure the std of q and k
after RoPE per layer and KV head, and moment-match (lln_core.moments). The tokenizer and its
chat template are saved too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from models.calibrate import calibrate
from models.configuration_lln import LLNConfig
from models.errors import ConversionError
from models.modeling_lln import LLN_PARAMETERS, LLNForCausalLM

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# Fields copied verbatim from the source config.
SHARED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_source(src: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a softmax checkpoint: local HF directory, .gguf file or hub id."""
    path = Path(src)
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ConversionError(f"GGUF file not found: {src}")
            kwargs = {"gguf_file": path.name}
            location = str(path.parent)
        elif path.is_dir():
            kwargs, location = {}, str(path)
            if not any((path / name).is_file() for name in TOKENIZER_FILES):
                raise ConversionError(
                    f"no tokenizer in {src} (looked for {', '.join(TOKENIZER_FILES)}): copy the "
                    "tokenizer files of the model next to its weights"
                )
        else:
            kwargs, location = {}, src  # a hub id
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    except ConversionError:
        raise
    except ValueError as error:  # transformers: unknown model type, unloadable tokenizer
        raise ConversionError(f"cannot load {src!r}: {str(error).splitlines()[0]}") from error
    except OSError as error:
        raise ConversionError(
            f"cannot load {src!r}: not a local checkpoint directory or .gguf file, and fetching it "
            f"from the Hugging Face hub failed (no network here?): {error}"
        ) from error
    _check_architecture(model.config)
    return model.eval(), tokenizer


def _check_architecture(config) -> None:
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"unsupported architecture {config.model_type!r}: LLN conversion maps Llama-family "
            f"decoders ({', '.join(SUPPORTED_ARCHITECTURES)}; SmolLM is llama)"
        )


def lln_config_from(source_config, kernel: str, **overrides) -> LLNConfig:
    """The LLN config of a Llama-family source config, with the given attention kernel."""
    fields = {name: getattr(source_config, name, None) for name in SHARED_FIELDS}
    fields = {name: value for name, value in fields.items() if value is not None}
    if source_config.model_type == "qwen2":
        fields.update(attention_bias=True, o_proj_bias=False)
    else:
        fields["attention_bias"] = bool(getattr(source_config, "attention_bias", False))
    fields["mlp_bias"] = bool(getattr(source_config, "mlp_bias", False))
    return LLNConfig(attention_kernel=kernel, **fields, **overrides)


def build_lln_model(source: PreTrainedModel, config: LLNConfig) -> LLNForCausalLM:
    """An LLN model holding the source's weights; alpha/beta/mix at their defaults."""
    model = LLNForCausalLM(config).to(source.dtype)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    missing = [name for name in missing if name.rsplit(".", 1)[-1] not in LLN_PARAMETERS]
    missing = [
        name for name in missing if name != "lm_head.weight" or not config.tie_word_embeddings
    ]
    if missing or unexpected:
        raise ConversionError(
            f"weights do not map 1:1: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()


def convert(
    src: str,
    out: str | Path,
    *,
    kernel: str = "lln_diag",
    calib_text: str | None = None,
    calib_tokens: int = 4096,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    **config_overrides,
) -> Path:
    """Convert `src` and save an LLN checkpoint (safetensors, config, tokenizer) to `out`."""
    source, tokenizer = load_source(src, dtype)
    config = lln_config_from(source.config, kernel, **config_overrides)
    model = build_lln_model(source, config)
    del source
    info = {"source": src, "kernel": kernel}
    if kernel in ("lln", "lln_diag"):
        text = calib_text if calib_text is not None else default_calibration_text()
        ids = torch.tensor(tokenizer(text)["input_ids"][:calib_tokens])
        calibration = calibrate(model, ids, progress=progress)
        info["calibration"] = calibration.to_json()
        if config.uses_sparse_cache:
            switch_lln_off(model)
            info["lln_part"] = "off until distilled"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "lln_conversion.json").write_text(json.dumps(info, indent=1))
    return out


@torch.no_grad()
def switch_lln_off(model: LLNForCausalLM) -> None:
    """The LLN part's log-weight to -inf. Beside a window, sinks and a sparse cache, the LLN
    part calibrated but not distilled swamps the window at long range (SmolLM2-135M, GPL-3 at
    4K windows: 439.79 against 18.37 with it off, level with the distilled default), so a
    converted model starts without it; distillation's parameters (`apply_params`) replace it."""
    for layer in model.model.layers:
        layer.self_attn.mix.fill_(float("-inf"))


# English text that ships with every Debian system (package base-files).
CALIBRATION_FILES = ("/usr/share/common-licenses/Apache-2.0", "/usr/share/common-licenses/MPL-2.0")
EVALUATION_FILE = "/usr/share/common-licenses/GPL-3"


def default_calibration_text() -> str:
    texts = [Path(p).read_text() for p in CALIBRATION_FILES if Path(p).is_file()]
    if not texts:
        raise ConversionError(
            f"no calibration text found ({', '.join(CALIBRATION_FILES)}): pass --calib-text FILE"
        )
    return "\n\n".join(texts)
