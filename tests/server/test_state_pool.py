"""The slot pool's write-back after a decode step copies only what one token can change, and
leaves the pool exactly as a full copy would."""

import pytest
import torch

from server.state_pool import StatePool
from tests.models.conftest import tiny_model

VOCAB = 29


def assert_pools_equal(a: StatePool, b: StatePool) -> None:
    for state_a, state_b in zip(a.states, b.states, strict=True):
        for x, y in zip(state_a.flat(), state_b.flat(), strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize("kernel", ["lln_diag", "lln", "ea"])
@pytest.mark.parametrize("slots", [[1, 2, 3], [4, 0, 2]], ids=["consecutive", "scattered"])
@torch.no_grad()
def test_one_token_write_back_equals_a_full_copy(kernel, slots):
    overrides = dict(local_size=4, num_sinks=2) if kernel == "lln_diag" else {}
    model = tiny_model(kernel, dtype=torch.float32, vocab_size=VOCAB, **overrides)
    full, one_token = StatePool(model, 5), StatePool(model, 5)
    gen = torch.Generator().manual_seed(0)
    # rows start inside the sinks, inside the ring, and with the ring already wrapped
    for slot, length in zip(slots, (1, 5, 11), strict=True):
        _, states = model.forward_states(torch.randint(VOCAB, (1, length), generator=gen))
        full.scatter([slot], states)
        one_token.scatter([slot], states)
    for _ in range(7):  # rows leave the sinks, fill the ring and wrap around
        ids = torch.randint(VOCAB, (len(slots), 1), generator=gen)
        logits_full, states_full = model.forward_states(ids, full.gather(slots))
        logits_one, states_one = model.forward_states(ids, one_token.gather(slots))
        assert torch.equal(logits_full, logits_one)
        full.scatter(slots, states_full)
        one_token.scatter(slots, states_one, one_token=True)
        assert_pools_equal(full, one_token)
    assert full.context_lengths(slots) == [8, 12, 18]
