"""Helpers shared by the kernels."""

import pytest
import torch

from lln_core.ops.common import round_to, slot_logits, slot_values


def test_round_to_bfloat16_matches_the_cast_and_survives_compile():
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 10.0 ** torch.randint(
        -20, 20, (10_000,), generator=torch.Generator().manual_seed(1)
    )
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8])])  # ties to even
    want = x.to(torch.bfloat16).to(torch.float32)
    assert torch.equal(round_to(x, torch.bfloat16), want)
    compiled = torch.compile(lambda t: round_to(t * 1.0, torch.bfloat16) + 0.0)
    assert torch.equal(compiled(x), want)
    assert torch.equal(round_to(x.double(), torch.bfloat16), want.double())
    assert round_to(x, torch.float32) is x


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_slot_logits_and_values_read_stored_keys_as_a_float64_reference(compiled, stored):
    """The compiled form reads narrow keys and values in place (a fused reduction); both forms
    give what a float64 product of the stored numbers gives."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 4, 64, generator=g)
    k = torch.randn(2, 3, 37, 64, generator=g).to(stored)
    v = torch.randn(2, 3, 37, 32, generator=g).to(stored)
    weights = torch.softmax(torch.randn(2, 3, 4, 37, generator=g), dim=-1)

    def read(q, k, v, weights):
        return slot_logits(q, k), slot_values(weights, v)

    logits, values = (torch.compile(read) if compiled else read)(q, k, v, weights)
    assert logits.dtype == values.dtype == torch.float32
    assert logits.shape == (2, 3, 4, 37) and values.shape == (2, 3, 4, 32)
    torch.testing.assert_close(
        logits.double(), q.double() @ k.double().transpose(-1, -2), atol=1e-4, rtol=1e-5
    )
    torch.testing.assert_close(values.double(), weights.double() @ v.double(), atol=1e-5, rtol=1e-5)
