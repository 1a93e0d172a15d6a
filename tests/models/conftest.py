import torch

from models import LLNConfig, LLNForCausalLM
from models.configuration_lln import ATTENTION_KERNELS

KERNELS = ATTENTION_KERNELS


def tiny_config(kernel: str, **overrides) -> LLNConfig:
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_kernel=kernel,
        local_size=5,
        num_sinks=2,
        chunk_size=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    return LLNConfig(**{**fields, **overrides})


def tiny_model(kernel: str, dtype=torch.float64, seed: int = 0, **overrides) -> LLNForCausalLM:
    torch.manual_seed(seed)
    model = LLNForCausalLM(tiny_config(kernel, **overrides)).to(dtype).eval()
    with torch.no_grad():  # away from the defaults, so that alpha/beta/mix matter
        for layer in model.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "alpha"):
                attn.alpha.uniform_(0.5, 2.0)
                attn.beta.uniform_(0.5, 2.0)
            if hasattr(attn, "mix"):
                attn.mix.uniform_(-1.0, 1.0)
            if hasattr(attn, "count_power"):
                attn.count_power.uniform_(0.0, 0.5)
            for name in ("q_map", "k_map"):
                if hasattr(attn, name):
                    getattr(attn, name).add_(0.3 * torch.randn_like(getattr(attn, name)))
    return model
