"""The engine on the real default model (slow: first use prepares the model)."""

import pytest

from models.registry import DEFAULT_MODEL, load_model
from server.config import EngineConfig
from server.engine import LLMEngine
from server.request import SamplingParams
from tests.server.test_engine import greedy_alone

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return load_model(DEFAULT_MODEL)


def test_batched_chunked_generation_equals_each_prompt_alone(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    texts = [
        "The capital of France is",
        "def fibonacci(n):\n    " * 3,
        "Once upon a time, in a land far away, there lived a princess who " * 4,
    ]
    prompts = [tokenizer(t).input_ids for t in texts]
    config = EngineConfig(
        max_num_seqs=3, max_num_batched_tokens=40, prefill_chunk_size=16, compile_decode=True
    )
    engine = LLMEngine(config, model, tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    engine.add_request("r0", prompts[0], params)
    tokens: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished() or step < 3:
        if step == 2:  # the others arrive while r0 decodes
            engine.add_request("r1", prompts[1], params)
            engine.add_request("r2", prompts[2], params)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        step += 1
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == greedy_alone(model, prompt, 8), texts[i]
    assert engine.pool.num_free == 3
    text = tokenizer.decode(tokens["r0"])
    assert "Paris" in text
