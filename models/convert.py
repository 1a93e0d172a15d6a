"""Softmax checkpoint (HF directory, .gguf file or hub id) -> LLN checkpoint.

Weights map 1:1 (the LLN model names its parameters as transformers' Llama does); the only new
parameters are alpha/beta per layer and KV head (and the lln_diag mix). alpha/beta come from
calibration: run the softmax model on text, measure the std of q and k after RoPE per layer and
KV head, and moment-match (lln_core.moments). The tokenizer and its chat template are saved too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lln_core.moments import head_std, moment_match
from models.configuration_lln import LLNConfig
from models.modeling_lln import LLNForCausalLM

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


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says why and what would work."""


@dataclass
class Calibration:
    """Per layer and KV head: the measured stds and the moment-matched alpha/beta."""

    sigma_q: Tensor  # [L, Hkv]
    sigma_k: Tensor
    alpha: Tensor
    beta: Tensor
    num_tokens: int

    def to_json(self) -> dict:
        return {
            "num_tokens": self.num_tokens,
            **{k: getattr(self, k).tolist() for k in ("sigma_q", "sigma_k", "alpha", "beta")},
        }


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
        else:
            kwargs, location = {}, src  # a hub id
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
    except ConversionError:
        raise
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
    new = {"alpha", "beta", "mix"}
    missing = [name for name in missing if name.rsplit(".", 1)[-1] not in new]
    missing = [
        name for name in missing if name != "lm_head.weight" or not config.tie_word_embeddings
    ]
    if missing or unexpected:
        raise ConversionError(
            f"weights do not map 1:1: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()


@torch.no_grad()
def calibrate(
    model: LLNForCausalLM,
    token_ids: Tensor,
    *,
    seq_len: int = 512,
    progress: bool = True,
) -> Calibration:
    """Measure sigma_q, sigma_k (after RoPE) with the model's weights in softmax mode, set
    alpha/beta on `model` by moment matching, and return the numbers.

    token_ids: [N] calibration tokens, cut into sequences of seq_len.
    """
    config = model.config
    if token_ids.numel() < 2:
        raise ConversionError("calibration needs at least 2 tokens of text")
    teacher = softmax_twin(model)
    queries: list[list[Tensor]] = [[] for _ in range(config.num_hidden_layers)]
    keys: list[list[Tensor]] = [[] for _ in range(config.num_hidden_layers)]

    def observe(layer: int, q: Tensor, k: Tensor) -> None:
        queries[layer].append(q.float())
        keys[layer].append(k.float())

    for layer in teacher.model.layers:
        layer.self_attn.observer = observe
    num_seqs = math.ceil(token_ids.numel() / seq_len)
    for i in tqdm(range(num_seqs), desc="calibrating", disable=not progress):
        ids = token_ids[i * seq_len : (i + 1) * seq_len][None].to(model.device)
        teacher.forward_states(ids, logits_to_keep=1)
    num_kv = config.num_key_value_heads
    sigma_q = torch.stack([_pooled_std(qs, num_kv) for qs in queries])
    sigma_k = torch.stack([_pooled_std(ks, num_kv) for ks in keys])
    alpha, beta = moment_match(sigma_q, sigma_k, config.head_dim)
    if model.config.attention_kernel in ("lln", "lln_diag"):
        for layer, a, b in zip(model.model.layers, alpha, beta, strict=True):
            layer.self_attn.alpha.copy_(a)
            layer.self_attn.beta.copy_(b)
    return Calibration(sigma_q, sigma_k, alpha, beta, int(token_ids.numel()))


def softmax_twin(model: LLNForCausalLM) -> LLNForCausalLM:
    """The same weights with softmax attention (the teacher), sharing no parameters."""
    config = LLNConfig.from_dict({**model.config.to_dict(), "attention_kernel": "softmax"})
    twin = LLNForCausalLM(config).to(model.dtype).to(model.device)
    twin.load_state_dict(model.state_dict(), strict=False)
    return twin.eval()


def _pooled_std(chunks: list[Tensor], num_kv_heads: int) -> Tensor:
    """Std per KV group over all sequences: chunks of [1, H, T, D]."""
    return head_std(torch.cat(chunks, dim=2), num_kv_heads)


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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "lln_conversion.json").write_text(json.dumps(info, indent=1))
    return out


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
