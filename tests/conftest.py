import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as token_models
from transformers import PreTrainedTokenizerFast


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def randn(gen: torch.Generator, *shape: int, dtype=torch.float64, scale: float = 1.0):
    return torch.randn(*shape, generator=gen, dtype=dtype) * scale


def feature_maps(gen, num_q_heads, num_kv_heads, head_dim=8, dtype=torch.float64):
    """Linear feature maps: scale times (identity + a random perturbation), per head."""
    eye = torch.eye(head_dim, dtype=dtype)
    noise = lambda heads: randn(gen, heads, head_dim, head_dim, dtype=dtype, scale=0.4)  # noqa: E731
    w_q = torch.linspace(0.8, 1.5, num_q_heads, dtype=dtype)[:, None, None] * (
        eye + noise(num_q_heads)
    )
    w_k = torch.linspace(1.2, 0.6, num_kv_heads, dtype=dtype)[:, None, None] * (
        eye + noise(num_kv_heads)
    )
    return w_q, w_k


def gpu_available() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not gpu_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def char_tokenizer() -> PreTrainedTokenizerFast:
    return make_char_tokenizer()


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer over characters (no hub, no files)."""
    vocab = {"[UNK]": 0, "</s>": 1, " ": 2, **{chr(97 + i): 3 + i for i in range(26)}}
    tokenizer = Tokenizer(token_models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()  # characters back to text without separators
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="</s>")
