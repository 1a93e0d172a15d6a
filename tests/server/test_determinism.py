"""`--deterministic` (the default): a request's greedy tokens and their logprobs are the same
bits alone and among any other requests (prompts prefilled together or apart, decode batches
of any size, a token budget that makes prompts wait), float32 and int8; a prefix-cache hit
gives the bits of the miss."""

import pytest
import torch

from models.quantize import quantize_int8
from models.registry import DEFAULT_MODEL, load_model
from server.config import EngineConfig
from server.engine import LLMEngine
from server.request import SamplingParams
from tests.models.conftest import tiny_model
from tests.server.test_engine import prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)


@pytest.fixture(params=["float32", "int8"])
def model(request):
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=29, hidden_size=64,
                       intermediate_size=192, local_size=4, num_sinks=1, sparse_cache_size=3,
                       sparse_span=1, kv_cache_dtype="bfloat16")  # fmt: skip
    return quantize_int8(model) if request.param == "int8" else model


def generate(engine: LLMEngine, cases: list[list[int]], params=GREEDY) -> dict[int, tuple]:
    """All cases submitted at once; (tokens, logprobs) per case."""
    for i, prompt in enumerate(cases):
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list] = {}
    logprobs: dict[str, list] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            logprobs.setdefault(out.request_id, []).extend(p.logprob for p in out.logprobs or [])
    return {i: (tokens[f"r{i}"], logprobs[f"r{i}"]) for i in range(len(cases))}


def test_greedy_logprobs_do_not_depend_on_the_other_requests(model, char_tokenizer):
    """Budget 24 with chunks of 8: prompts wait for room instead of being cut where the load
    says, and decode batches go from 1 to 8 rows."""
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=24, prefill_chunk_size=8,
                          compile_decode=False)  # fmt: skip
    engine = LLMEngine(config, model, char_tokenizer)
    cases = prompts(8, seed=4)
    alone = {i: generate(engine, [case])[0] for i, case in enumerate(cases)}
    for batch in (2, 5, 8):
        together = generate(engine, cases[:batch])
        assert together == {i: alone[i] for i in range(batch)}, batch


def test_a_prefix_cache_hit_gives_the_bits_of_the_miss(model, char_tokenizer):
    config = EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, prefill_chunk_size=8,
                          compile_decode=False)  # fmt: skip
    cold = LLMEngine(config, model, char_tokenizer)
    prompt = prompts(1, seed=5)[0] * 3
    miss = generate(cold, [prompt])[0]
    hit = generate(cold, [prompt])[0]
    assert cold.prefix_cache.hits == 1
    assert hit == miss


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int8", "float32"])
def test_the_default_model_decodes_alike_alone_and_among_16(dtype):
    """The real model, compiled decode: 16 chat prompts alone and all together."""
    model, tokenizer = load_model(DEFAULT_MODEL, dtype=getattr(torch, dtype))
    questions = ["What is the capital of France?", "Give me three colours.",
                 "Write one sentence about the sea.", "What is 12 times 7?"] * 4  # fmt: skip
    cases = [
        tokenizer.apply_chat_template([{"role": "user", "content": f"{q} ({i})"}],
                                      add_generation_prompt=True, tokenize=False)
        for i, q in enumerate(questions)
    ]  # fmt: skip
    cases = [tokenizer(text).input_ids for text in cases]
    engine = LLMEngine(EngineConfig(max_num_seqs=16), model, tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    alone = {i: generate(engine, [case], params)[0] for i, case in enumerate(cases)}
    assert generate(engine, cases, params) == alone
    assert generate(engine, cases[:5], params) == {i: alone[i] for i in range(5)}
