import math

import pytest
import torch

from server.request import SamplingParams
from server.sampler import (
    Sampler,
    apply_min_p,
    apply_min_tokens,
    apply_penalties,
    apply_top_k_top_p,
    compute_logprobs,
)

VOCAB = 50


def sample(sampler, logits, params, outputs=None, prompts=None, generators=None):
    batch = logits.shape[0]
    prompts = prompts if prompts is not None else [[1]] * batch
    outputs = outputs if outputs is not None else [[]] * batch
    return sampler(logits, params, prompts, outputs, generators)


@pytest.fixture
def logits(gen) -> torch.Tensor:
    return torch.randn(6, VOCAB, generator=gen)


def test_greedy_is_argmax(logits):
    out = sample(Sampler(seed=0), logits, [SamplingParams(temperature=0.0)] * 6)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None


def test_top_k_one_and_tiny_top_p_are_greedy(logits):
    sampler = Sampler(seed=0)
    for params in (SamplingParams(top_k=1), SamplingParams(top_p=1e-4, temperature=1.5)):
        for _ in range(5):
            out = sample(sampler, logits, [params] * 6)
            assert torch.equal(out.token_ids, logits.argmax(-1))


def test_top_k_top_p_masks():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = probs.log()
    kept = apply_top_k_top_p(logits, torch.tensor([4, 4]), torch.tensor([0.75, 0.75])).isfinite()
    assert kept.tolist() == [[True, True, False, False], [False, False, True, True]]
    kept = apply_top_k_top_p(logits, torch.tensor([3, 1]), torch.tensor([1.0, 1.0])).isfinite()
    assert kept.tolist() == [[True, True, True, False], [False, False, False, True]]
    kept = apply_top_k_top_p(logits, torch.tensor([4, 4]), torch.tensor([1e-6, 1.0])).isfinite()
    assert kept.tolist() == [[True, False, False, False], [True, True, True, True]]


def test_min_p_masks_below_fraction_of_top_probability():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]]).log()
    kept = apply_min_p(logits, torch.tensor([0.2, 0.99])).isfinite()
    # Threshold 0.2 * 0.5 = 0.1 drops only 0.05; a flat row keeps everything.
    assert kept.tolist() == [[True, True, True, False], [True, True, True, True]]
    out = sample(Sampler(seed=0), logits[:1].expand(2000, 4), [SamplingParams(min_p=0.2)] * 2000)
    assert (out.token_ids != 3).all()


def test_penalties_match_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 1.0], [2.0, -1.0, 0.5, -0.5, 1.0]])
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),
    ]
    out = apply_penalties(logits.clone(), params, [[0, 1], [0, 1]], [[2, 2, 3], [2, 2, 3]])
    # Seen in prompt or output: 0, 1, 2, 3 -> 2/2, -1*2, 0.5/2, -0.5*2; then on outputs
    # token 2 (twice): -0.5*2 - 0.25, token 3 (once): -0.5 - 0.25.
    expected = torch.tensor([1.0, -2.0, 0.25 - 1.0 - 0.25, -1.0 - 0.5 - 0.25, 1.0])
    torch.testing.assert_close(out[0], expected, rtol=0, atol=0)
    torch.testing.assert_close(out[1], logits[1], rtol=0, atol=0)


def test_presence_and_frequency_ignore_prompt_tokens():
    logits = torch.zeros(1, 4)
    params = [SamplingParams(frequency_penalty=1.0, presence_penalty=1.0)]
    out = apply_penalties(logits, params, [[0, 0, 1]], [[2]])
    assert out.tolist() == [[0.0, 0.0, -2.0, 0.0]]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.zeros(3, 6)
    params = [
        SamplingParams(min_tokens=2, stop_token_ids=[4]),
        SamplingParams(min_tokens=2, stop_token_ids=[4], ignore_eos=True),
        SamplingParams(min_tokens=2, stop_token_ids=[4]),
    ]
    out = apply_min_tokens(logits, params, [1, 1, 2], eos_token_ids=[5])
    assert out.isinf().tolist() == [
        [False] * 4 + [True, True],
        [False] * 4 + [True, False],
        [False] * 6,
    ]
    eos_logits = torch.full((1, 6), -5.0)
    eos_logits[0, 5] = 10.0
    out = sample(Sampler([5]), eos_logits, [SamplingParams(temperature=0, min_tokens=1)])
    assert out.token_ids.item() != 5


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_seed_reproduces_whatever_the_batch(gen, device):
    steps = [torch.randn(8, 1000, generator=gen).to(device) for _ in range(5)]
    seeded = SamplingParams(seed=7)

    def run(row: int, batch: list[SamplingParams]) -> list[int]:
        sampler = Sampler(seed=123 + len(batch), device=device)
        generators = [sampler.make_generator(p.seed) if p.seed is not None else None for p in batch]
        tokens = []
        for step_logits in steps:
            rows = step_logits[: len(batch)].clone()
            rows[row] = step_logits[0]
            tokens.append(sample(sampler, rows, batch, generators=generators).token_ids[row].item())
        return tokens

    alone = run(0, [seeded])
    crowded = [SamplingParams(), SamplingParams(seed=1), SamplingParams(temperature=0), seeded]
    assert run(3, crowded) == alone
    assert run(1, [SamplingParams(top_k=5), seeded, SamplingParams(seed=7)]) == alone
    assert run(0, [SamplingParams(seed=8)]) != alone


def test_logprobs_are_raw_log_softmax(logits):
    params = [
        SamplingParams(temperature=0.3, logprobs=3, repetition_penalty=1.5, top_k=4),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(),
        SamplingParams(logprobs=5, min_p=0.5),
        SamplingParams(temperature=2.0, logprobs=1),
        SamplingParams(top_p=0.5, logprobs=2),
    ]
    out = sample(Sampler(seed=0), logits, params, outputs=[[1, 2]] * 6)
    expected = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, expected.gather(1, out.token_ids[:, None])[:, 0])
    values, ids = expected.topk(5, dim=-1)
    torch.testing.assert_close(out.top_logprobs, values)
    assert torch.equal(out.top_token_ids, ids)
    chosen, top = out.row_logprobs(0, 3)
    assert chosen == pytest.approx(expected[0, out.token_ids[0]].item())
    assert [t for t, _ in top] == ids[0, :3].tolist()


def test_prompt_logprobs_helper(logits):
    targets = torch.tensor([3, 1, 4, 1, 5, 9])
    chosen, top_ids, top_values = compute_logprobs(logits, targets, 2)
    expected = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(chosen, expected[torch.arange(6), targets])
    assert top_ids.shape == top_values.shape == (6, 2)


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        (SamplingParams(temperature=0.7), 4),
        (SamplingParams(temperature=1.3, top_k=2), 2),
    ],
)
def test_frequencies_follow_softmax(params, keep):
    num_draws = 20000
    logits = torch.tensor([0.5, -1.0, 2.0, 0.1])
    out = sample(Sampler(seed=0), logits.expand(num_draws, 4), [params] * num_draws)
    counts = torch.bincount(out.token_ids, minlength=4).double() / num_draws
    top = logits.topk(keep).indices
    expected = torch.zeros(4, dtype=torch.double)
    expected[top] = torch.softmax(logits[top].double() / params.temperature, dim=-1)
    # About 6 standard deviations of a frequency over 20000 draws.
    assert (counts - expected).abs().max() < 6 * math.sqrt(0.25 / num_draws)


def test_unseeded_rows_differ_and_seeded_generators_are_per_row(gen):
    logits = torch.zeros(2, 1000)
    sampler = Sampler(seed=0)
    out = sample(sampler, logits, [SamplingParams()] * 2)
    assert out.token_ids[0] != out.token_ids[1]
    generators = [sampler.make_generator(5), sampler.make_generator(5)]
    out = sample(sampler, logits, [SamplingParams(seed=5)] * 2, generators=generators)
    assert out.token_ids[0] == out.token_ids[1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_to_host_moves_ids_and_logprobs_once(logits, device):
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0)]
    out = Sampler(device=device)(logits[:2].to(device), params, [[], []], [[], []])
    host = out.to_host()
    assert all(t.device.type == "cpu" for t in (host.token_ids, host.logprobs, host.top_logprobs))
    assert host.token_ids.tolist() == out.token_ids.tolist()
    assert host.row_logprobs(0, 2) == out.row_logprobs(0, 2)
    assert Sampler()(logits[:1], params[1:], [[]], [[]]).to_host().logprobs is None
