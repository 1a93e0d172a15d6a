"""The peer of bench_engine's GPU goals: the same weights as a softmax Llama in transformers,
decoding with its static KV cache (`generate(..., cache_implementation="static")`, which
torch.compiles the forward on CUDA, CUDA graphs included)."""

from __future__ import annotations

import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.modeling_lln import LLN_PARAMETERS, LLNForCausalLM

# LLN config fields that are not Llama's, and bookkeeping a config must not be given
_NOT_LLAMA = ("model_type", "architectures", "transformers_version")


def softmax_peer(model: LLNForCausalLM) -> LlamaForCausalLM:
    """A LlamaForCausalLM holding `model`'s weights (its LLN parameters dropped), same dtype
    and device."""
    llama_fields = LlamaConfig().to_dict()
    fields = {k: v for k, v in model.config.to_dict().items()
              if k in llama_fields and k not in _NOT_LLAMA}  # fmt: skip
    peer = LlamaForCausalLM(LlamaConfig(**fields))
    weights = {k: v for k, v in model.state_dict().items()
               if k.rsplit(".", 1)[-1] not in LLN_PARAMETERS}  # fmt: skip
    missing, unexpected = peer.load_state_dict(weights, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise ValueError(f"weights do not map 1:1: missing {missing}, unexpected {unexpected}")
    return peer.to(model.lm_head.weight.device, model.lm_head.weight.dtype).eval()


@torch.no_grad()
def peer_decode(peer: LlamaForCausalLM, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Decode ms per step and tokens/s of `batch` sequences: generate() of new_tokens minus
    generate() of one (its prefill), after a warm-up run (compilation)."""
    device = peer.lm_head.weight.device
    gen = torch.Generator().manual_seed(0)
    vocab = peer.config.vocab_size
    ids = torch.randint(min(100, vocab // 2), min(4000, vocab), (batch, prompt_len), generator=gen)
    ids = ids.to(device)
    kwargs = dict(do_sample=False, cache_implementation="static", pad_token_id=0)

    def timed(count: int) -> float:
        _sync(device)
        began = time.perf_counter()
        peer.generate(ids, max_new_tokens=count, min_new_tokens=count, **kwargs)
        _sync(device)
        return time.perf_counter() - began

    timed(new_tokens)  # warm-up: compiles, captures
    step = (timed(new_tokens) - timed(1)) / (new_tokens - 1)
    return {"ms_per_step": step * 1e3, "tokens_per_s": batch / step}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
