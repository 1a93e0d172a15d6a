"""`--deterministic`: a request's greedy tokens and their logprobs are the same
bits alone and among any other requests (prompts prefilled together or apart, decode batches
of any size, a token budget that makes prompts wait), float32 and int8; a prefix-cache hit
gives the bits of the miss."""

import pytest
import torch

from models import int8_kernel
from models.evaluate import evaluation_text
from models.quantize import is_quantized, quantize_int8
from models.registry import DEFAULT_MODEL, load_model
from server.config import EngineConfig
from server.engine import LLMEngine
from server.request import SamplingParams
from tests.models.conftest import tiny_model
from tests.server.test_api import serving
from tests.server.test_engine import prompts

# float32 logprobs of the real model: another prefill split, or decode in place of prefill,
# sums in another order (measured on the test's 12 tokens: 0.0056 for chunks of 64 against
# 512, 0.013 for a session continued against the whole conversation)
CHUNKING_TOLERANCE = 0.05
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
                          compile_decode=False, deterministic=True)  # fmt: skip
    engine = LLMEngine(config, model, char_tokenizer)
    cases = prompts(8, seed=4)
    alone = {i: generate(engine, [case])[0] for i, case in enumerate(cases)}
    for batch in (2, 5, 8):
        together = generate(engine, cases[:batch])
        assert together == {i: alone[i] for i in range(batch)}, batch


def test_it_is_on_by_default_where_it_costs_nothing(model, char_tokenizer):
    """int8 weights on a CPU without AMX: on (measured free); float32: off (1 row padded to 4
    costs a quarter of one sequence's speed); an explicit setting wins."""
    default = LLMEngine(EngineConfig(compile_decode=False), model, char_tokenizer)
    assert default.deterministic == (is_quantized(model) and not int8_kernel.amx_available())
    config = EngineConfig(compile_decode=False, deterministic=True)
    forced = LLMEngine(config, model, char_tokenizer)
    assert forced.deterministic is True


def test_a_prefix_cache_hit_gives_the_bits_of_the_miss(model, char_tokenizer):
    config = EngineConfig(max_num_seqs=2, max_num_batched_tokens=16, prefill_chunk_size=8,
                          compile_decode=False, deterministic=True)  # fmt: skip
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
    engine = LLMEngine(EngineConfig(max_num_seqs=16, deterministic=True), model, tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)
    alone = {i: generate(engine, [case], params)[0] for i, case in enumerate(cases)}
    assert generate(engine, cases, params) == alone
    assert generate(engine, cases[:5], params) == {i: alone[i] for i in range(5)}


def test_the_api_answers_a_prompt_alike_alone_and_among_others(model, char_tokenizer):
    """Through the HTTP API: a request of 6 prompts (prefilled and decoded together) gives
    each the text and logprobs it gets alone."""
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=24, prefill_chunk_size=8,
                          compile_decode=False, deterministic=True)  # fmt: skip
    cases = prompts(6, seed=6)

    def body(prompt) -> dict:
        return {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0,
                "ignore_eos": True, "logprobs": 1}  # fmt: skip

    def answer(choice: dict) -> tuple:
        return choice["text"], choice["logprobs"]["token_logprobs"]

    with serving(LLMEngine(config, model, char_tokenizer)) as (client, _):
        alone = [answer(client.post("/v1/completions", json=body(c)).json()["choices"][0])
                 for c in cases]  # fmt: skip
        together = client.post("/v1/completions", json=body(cases)).json()["choices"]
    assert [answer(c) for c in sorted(together, key=lambda c: c["index"])] == alone


def greedy_text(engine: LLMEngine, prompt: list[int], params, session_id=None) -> tuple:
    engine.add_request("one", prompt, params, session_id)
    tokens, logprobs = [], []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.token_ids
            logprobs += [p.logprob for p in out.logprobs or []]
    return tokens, logprobs


@pytest.mark.slow
def test_the_default_model_answers_alike_whatever_the_chunking_and_the_session():
    """The real model, float32: an 800-token prompt prefilled in chunks of 64 or of 512 gives
    the same greedy tokens (logprobs within CHUNKING_TOLERANCE: the chunked form sums in
    blocks that start where each call starts), and a session continued with a second turn
    gives the tokens of the whole conversation prefilled at once (the first answer went
    through decode steps there, through prefill here: logprobs within the same tolerance)."""
    model, tokenizer = load_model(DEFAULT_MODEL, dtype=torch.float32)
    text = evaluation_text()[:3200]
    first = tokenizer(text + "\n\nSummarise the text above in one sentence:").input_ids
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=0)

    def engine(chunk: int) -> LLMEngine:
        config = EngineConfig(max_num_seqs=2, prefill_chunk_size=chunk, compile_decode=False,
                              prefix_cache_bytes=0, deterministic=True)  # fmt: skip
        return LLMEngine(config, model, tokenizer)

    tokens_512, logprobs_512 = greedy_text(engine(512), first, params)
    tokens_64, logprobs_64 = greedy_text(engine(64), first, params)
    assert tokens_64 == tokens_512
    assert max_gap(logprobs_64, logprobs_512) <= CHUNKING_TOLERANCE

    sessions = engine(512)
    answer, _ = greedy_text(sessions, first, params, session_id="s")
    second = tokenizer(" Now say it in French:", add_special_tokens=False).input_ids
    continued, logprobs_continued = greedy_text(sessions, second, params, session_id="s")
    whole, logprobs_whole = greedy_text(engine(512), first + answer + second, params)
    assert answer == tokens_512
    assert continued == whole
    assert max_gap(logprobs_continued, logprobs_whole) <= CHUNKING_TOLERANCE


def max_gap(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))
