"""LLN decoders as Hugging Face transformers models. Importing this package registers them with
AutoConfig / AutoModel / AutoModelForCausalLM under model_type "lln_llama"."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from models.cache import LLNCache
from models.configuration_lln import LLNConfig
from models.modeling_lln import LLNForCausalLM, LLNModel

AutoConfig.register(LLNConfig.model_type, LLNConfig, exist_ok=True)
AutoModel.register(LLNConfig, LLNModel, exist_ok=True)
AutoModelForCausalLM.register(LLNConfig, LLNForCausalLM, exist_ok=True)

__all__ = ["LLNCache", "LLNConfig", "LLNForCausalLM", "LLNModel"]
