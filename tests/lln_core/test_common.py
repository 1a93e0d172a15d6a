"""Helpers shared by the kernels."""

import torch

from lln_core.ops.common import round_to


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
