"""`set_batch_invariant`: a decode row ([B, 1, K] inputs) gets the same bits from every linear
layer kind whatever the number of rows with it, at the default model's shapes; prefill inputs
keep the fastest kernel per row count."""

import pytest
import torch
from torch import nn

from models import int8_kernel
from models.quantize import (
    Bf16GemmLinear,
    Int8Linear,
    PaddedLinear,
    set_batch_invariant,
)
from tests.models.conftest import tiny_model

BATCHES = (1, 2, 3, 4, 5, 8, 16, 17, 40)
needs_vnni = pytest.mark.skipif(not int8_kernel.available(), reason="no AVX-512 VNNI kernel here")


def layer_of(kind: str, n: int = 1536, k: int = 576) -> nn.Module:
    gen = torch.Generator().manual_seed(n + k)
    linear = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) * 0.05)
    layers = {
        "float32": lambda: linear,
        "bf16-gemm": lambda: Bf16GemmLinear(linear),
        "int8": lambda: Int8Linear(linear, vnni=False),
        "int8-vnni": lambda: Int8Linear(linear, vnni=True),
    }
    return nn.Sequential(layers[kind]())


@pytest.mark.parametrize(
    "kind", ["float32", "bf16-gemm", "int8", pytest.param("int8-vnni", marks=needs_vnni)]
)
def test_a_decode_row_has_the_same_bits_in_any_batch(kind):
    model = set_batch_invariant(layer_of(kind))
    assert not any(type(m) is nn.Linear for m in model.modules())
    x = torch.randn(40, 1, 576, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        alone = torch.cat([model(x[i : i + 1]) for i in range(40)])
        for batch in BATCHES:
            assert torch.equal(model(x[:batch]), alone[:batch]), batch
            assert torch.equal(model(x[40 - batch :]), alone[40 - batch :]), batch


@pytest.mark.parametrize("kind", ["bf16-gemm", "int8"])
def test_prefill_inputs_keep_the_fastest_kernel(kind):
    """[1, T, K]: the same numbers with and without batch invariance (a prefill chunk runs in a
    forward of its own, so its row count depends on its prompt alone)."""
    model = layer_of(kind)
    x = torch.randn(1, 70, 576, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast = model(x)
        assert torch.equal(set_batch_invariant(model)(x), fast)
        assert torch.equal(set_batch_invariant(model, enabled=False)(x), fast)


def test_a_float32_model_keeps_its_tied_embedding_and_decodes_alike_in_any_batch():
    """Every nn.Linear becomes a PaddedLinear on the same Parameter; a whole model's decode
    step (eager) then gives row 0 the same logits alone and among 2, 3, 5 rows."""
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=64, hidden_size=64,
                       intermediate_size=192, tie_word_embeddings=True)  # fmt: skip
    set_batch_invariant(model)
    assert isinstance(model.lm_head, PaddedLinear)
    assert model.get_input_embeddings().weight is model.lm_head.weight
    ids = torch.randint(1, 64, (5, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, states = model.forward_states(ids)
        token = ids[:, :1]
        alone, _ = model.forward_states(token[:1], states_rows(states, 1))
        for batch in (2, 3, 5):
            logits, _ = model.forward_states(token[:batch], states_rows(states, batch))
            assert torch.equal(logits[:1], alone), batch


def states_rows(states: list, batch: int) -> list:
    """The first `batch` rows of every state, as copies."""
    return [s.unflat(tuple(t[:batch].clone() for t in s.flat())) for s in states]
