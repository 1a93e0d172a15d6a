"""bench_engine's peer holds the same weights: as a softmax Llama in transformers it gives the
logits of the LLN model run with the softmax kernel, and its timing runs (CPU, tiny)."""

import torch

from benchmarks.softmax_peer import peer_decode, softmax_peer
from tests.models.conftest import tiny_model


@torch.no_grad()
def test_peer_is_the_same_weights_as_a_softmax_llama():
    model = tiny_model("softmax", dtype=torch.float32)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(softmax_peer(model)(ids).logits, model(ids).logits)


def test_peer_drops_the_lln_parameters_and_times_decode():
    peer = softmax_peer(tiny_model("lln_diag", dtype=torch.float32))
    result = peer_decode(peer, batch=2, prompt_len=5, new_tokens=3)
    assert result["ms_per_step"] > 0 and result["tokens_per_s"] > 0
