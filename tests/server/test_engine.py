"""The engine on a tiny random model: batching, chunked prefill, seeds, prefix cache, sessions,
forks, aborts, limits, failures. Every expected token comes from the model run alone."""

import asyncio
import random

import pytest
import torch

from server.async_engine import AsyncEngine, EngineDeadError
from server.config import EngineConfig
from server.engine import LLMEngine
from server.errors import QueueFullError
from server.llm import LLM
from server.prefix_cache import SessionError
from server.request import SamplingParams
from server.serve import warm_up
from tests.models.conftest import tiny_model

VOCAB = 29  # the char tokenizer's


@pytest.fixture(params=[(0, "auto"), (3, "bfloat16")], ids=["window", "window+sparse-cache-bf16"])
def model(request):
    """LLN+Diag, and the same with a sparse cache and bfloat16 keys/values, as the default
    model (its scores' state rides in every slot)."""
    size, kv = request.param
    return tiny_model("lln_diag", dtype=torch.float32, vocab_size=VOCAB, local_size=4, num_sinks=1,
                      sparse_cache_size=size, sparse_span=1, kv_cache_dtype=kv)  # fmt: skip


def make_engine(model, tokenizer, **overrides) -> LLMEngine:
    fields = dict(
        max_num_seqs=3,
        max_num_batched_tokens=8,
        max_waiting=64,
        prefill_chunk_size=4,
        compile_decode=False,
        seed=0,
    )
    return LLMEngine(EngineConfig(**{**fields, **overrides}), model, tokenizer)


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


@torch.no_grad()
def greedy_alone(model, prompt: list[int], max_tokens: int) -> list[int]:
    """The reference: the whole prompt in one forward, then one token at a time."""
    logits, states = model.forward_states(torch.tensor([prompt]))
    tokens = []
    for _ in range(max_tokens):
        tokens.append(int(logits[0, -1].argmax()))
        logits, states = model.forward_states(torch.tensor([[tokens[-1]]]), states)
    return tokens


def run_all(engine: LLMEngine, arrivals: dict[int, list[tuple]] | None = None) -> dict:
    """Step until idle, adding requests at the given steps; tokens and outputs per choice."""
    arrivals = dict(arrivals or {})
    tokens, outputs, step = {}, {}, 0
    while arrivals or engine.has_unfinished():
        for args in arrivals.pop(step, []):
            engine.add_request(*args)
        for out in engine.step():
            key = (out.request_id, out.index)
            tokens.setdefault(key, []).extend(out.token_ids)
            outputs.setdefault(key, []).append(out)
        step += 1
    return {"tokens": tokens, "outputs": outputs}


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 23))] for _ in range(count)]


def test_batched_generation_equals_each_prompt_alone(model, char_tokenizer):
    engine = make_engine(model, char_tokenizer)
    cases = prompts(6)
    arrivals: dict[int, list] = {}
    for i, (step, prompt) in enumerate(zip((0, 0, 1, 3, 3, 9), cases, strict=True)):
        arrivals.setdefault(step, []).append((f"r{i}", prompt, greedy(7)))
    got = run_all(engine, arrivals)["tokens"]
    for i, prompt in enumerate(cases):
        assert got[f"r{i}", 0] == greedy_alone(model, prompt, 7), i
    assert engine.pool.num_free == engine.pool.num_slots


def test_tenants_share_steps_fairly_and_outputs_stay_exact(model, char_tokenizer):
    """A tenant's new request prefills before (not beside) the prompt of a tenant that holds
    more sequences; every output still equals its prompt alone."""
    engine = make_engine(model, char_tokenizer, max_num_seqs=4, max_num_batched_tokens=32,
                         prefill_chunk_size=32)  # fmt: skip
    cases = prompts(4, seed=3)
    for i in range(2):
        engine.add_request(f"a{i}", cases[i], greedy(6), tenant="a")
    engine.step()
    engine.add_request("a2", cases[2], greedy(6), tenant="a")
    engine.add_request("b0", cases[3], greedy(6), tenant="b")
    assert engine.scheduler.get("b0").tenant == "b"
    first = {out.request_id: out.token_ids for out in engine.step() if out.token_ids}
    assert "b0" in first and "a2" not in first
    got = run_all(engine)["tokens"]
    got["b0", 0] = first["b0"] + got["b0", 0]
    for name, prompt in zip(("a2", "b0"), cases[2:], strict=True):
        assert got[name, 0] == greedy_alone(model, prompt, 6), name
    assert engine.pool.num_free == engine.pool.num_slots


def test_compiled_decode_gives_the_same_tokens(char_tokenizer):
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=VOCAB, local_size=4, num_sinks=1)
    engine = make_engine(model, char_tokenizer, compile_decode=True)
    cases = prompts(3, seed=1)
    got = run_all(engine, {0: [(f"r{i}", p, greedy(5)) for i, p in enumerate(cases)]})["tokens"]
    for i, prompt in enumerate(cases):
        assert got[f"r{i}", 0] == greedy_alone(model, prompt, 5)


def test_one_token_prefill_chunks_reuse_the_warm_decode_graph(char_tokenizer):
    """A one-token prompt, and a prompt whose last chunk is one token, prefill through the
    decode step the warm-up compiled: no new graph (a cold one costs ~40 s on 2 cores), and
    the tokens of the model run alone."""
    torch._dynamo.reset()  # graphs other tests' models left would be guarded against here
    model = tiny_model("lln_diag", dtype=torch.float32, vocab_size=VOCAB, local_size=4, num_sinks=1)
    engine = make_engine(model, char_tokenizer, compile_decode=True)
    warm_up(engine)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    cases = [[7], [3, 4, 5, 6, 8], [9, 2, 4, 6, 1]]  # chunks of 4: 1 | 4 + 1 | 4 + 1
    got = run_all(engine, {0: [(f"r{i}", p, greedy(4)) for i, p in enumerate(cases)]})["tokens"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    for i, prompt in enumerate(cases):
        assert got[f"r{i}", 0] == greedy_alone(model, prompt, 4)


def test_seeded_sampling_does_not_depend_on_the_batch(model, char_tokenizer):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)
    alone = run_all(make_engine(model, char_tokenizer), {0: [("x", [3, 4, 5], params)]})
    noise = [(f"n{i}", p, SamplingParams(max_tokens=6)) for i, p in enumerate(prompts(3))]
    crowded = run_all(make_engine(model, char_tokenizer), {0: noise, 2: [("x", [3, 4, 5], params)]})
    assert alone["tokens"]["x", 0] == crowded["tokens"]["x", 0]


def test_prefix_cache_hit_prefills_only_the_rest(model, char_tokenizer):
    engine = make_engine(model, char_tokenizer)
    shared = prompts(1, seed=3)[0] + [5] * 10
    longer = [*shared, 7, 8, 9]
    run_all(engine, {0: [("a", shared, greedy(3))]})
    before = engine.num_prefill_tokens
    result = run_all(engine, {0: [("b", longer, greedy(6))]})
    cached = len(shared) // 4 * 4
    assert result["outputs"]["b", 0][-1].num_cached_tokens == cached
    assert engine.num_prefill_tokens - before == len(longer) - cached
    assert result["tokens"]["b", 0] == greedy_alone(model, longer, 6)
    assert engine.prefix_cache.hits == 1


def test_session_continuation_equals_a_cold_run(model, char_tokenizer):
    engine = make_engine(model, char_tokenizer)
    first, second = [3, 9, 4, 12, 7], [8, 8, 20]
    out1 = run_all(engine, {0: [("t1", first, greedy(4), "s")]})["tokens"]["t1", 0]
    before = engine.num_prefill_tokens
    result = run_all(engine, {0: [("t2", second, greedy(5), "s")]})
    whole = [*first, *out1, *second]
    assert result["tokens"]["t2", 0] == greedy_alone(model, whole, 5)
    # only the new text and the last sampled token were prefilled
    assert engine.num_prefill_tokens - before == len(second) + 1
    assert result["outputs"]["t2", 0][-1].num_cached_tokens == len(first) + len(out1) - 1


def test_live_context_lengths_count_a_sessions_history(model, char_tokenizer):
    engine = make_engine(model, char_tokenizer)
    run_all(engine, {0: [("t1", [3, 9, 4, 12, 7], greedy(4), "s")]})
    engine.add_request("t2", [8, 8], greedy(5), "s")
    engine.step()  # prefills the pending token + 2 new ones on top of the restored state
    assert engine.live_context_lengths() == [5 + 4 + 2]


def test_session_errors_are_reported_not_silent(model, char_tokenizer):
    engine = make_engine(model, char_tokenizer, session_bytes=1)  # too small for one state
    run_all(engine, {0: [("t1", [3, 4], greedy(2), "s")]})
    with pytest.raises(SessionError, match="evicted"):
        engine.add_request("t2", [5], greedy(2), "s")
    engine = make_engine(model, char_tokenizer)
    engine.add_request("t1", [3, 4], greedy(2), "busy")
    with pytest.raises(SessionError, match="in use"):
        engine.add_request("t2", [5], greedy(2), "busy")


def test_n_choices_fork_the_state_and_match_single_seeded_runs(model, char_tokenizer):
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=6, ignore_eos=True)
    # n may not exceed the slots, but a busy slot makes a fork wait for one
    engine = make_engine(model, char_tokenizer, max_num_seqs=3)
    prompt, busy = [4, 5, 6, 7, 8, 9], SamplingParams(max_tokens=12, ignore_eos=True)
    forked = run_all(engine, {0: [("busy", [3, 3], busy), ("f", prompt, params)]})["tokens"]
    assert engine.num_prefill_tokens == len(prompt) + 2  # prefilled once for the three choices
    for index in range(3):
        single = SamplingParams(temperature=1.0, seed=11 + index, max_tokens=6, ignore_eos=True)
        alone = run_all(make_engine(model, char_tokenizer), {0: [("s", prompt, single)]})
        assert forked["f", index] == alone["tokens"]["s", 0]
    assert engine.pool.num_free == 3


def test_prompt_logprobs_equal_log_softmax_of_the_model(model, char_tokenizer):
    engine = make_engine(model, char_tokenizer)
    prompt = prompts(1, seed=5)[0] + [3, 4, 5, 6, 7]
    params = SamplingParams(max_tokens=0, prompt_logprobs=2)
    out = run_all(engine, {0: [("p", prompt, params)]})["outputs"]["p", 0]
    assert len(out) == 1 and out[0].finished and out[0].finish_reason == "length"
    entries = out[0].prompt_logprobs
    with torch.no_grad():
        logits = model.forward_states(torch.tensor([prompt]))[0][0]
    expected = torch.log_softmax(logits.double(), -1)
    assert entries[0] is None and len(entries) == len(prompt)
    for position, entry in enumerate(entries[1:], start=1):
        assert entry.token_id == prompt[position]
        assert entry.logprob == pytest.approx(
            float(expected[position - 1, entry.token_id]), abs=1e-4
        )
        assert len(entry.top) == 2


def test_sampled_logprobs_equal_log_softmax(model, char_tokenizer):
    engine = make_engine(model, char_tokenizer)
    out = run_all(engine, {0: [("p", [3, 4, 5], greedy(1, logprobs=3))]})["outputs"]["p", 0][0]
    with torch.no_grad():
        logits = model.forward_states(torch.tensor([[3, 4, 5]]))[0][0, -1]
    expected = torch.log_softmax(logits.double(), -1)
    (entry,) = out.logprobs
    assert entry.logprob == pytest.approx(float(expected[entry.token_id]), abs=1e-4)
    assert [t for t, _ in entry.top] == expected.topk(3).indices.tolist()


def test_stop_string_ends_the_request_and_is_not_emitted(model, char_tokenizer):
    engine = make_engine(model, char_tokenizer)
    free = run_all(engine, {0: [("a", [3, 4, 5], greedy(12))]})["outputs"]["a", 0]
    text = "".join(o.text for o in free)
    stop = text[4:6]  # appears in the greedy text: the run must stop right before it
    stopped = run_all(engine, {0: [("b", [3, 4, 5], greedy(12, stop=[stop]))]})["outputs"]["b", 0]
    assert "".join(o.text for o in stopped) == text[: text.index(stop)]
    assert stopped[-1].finish_reason == "stop"


def test_abort_mid_prefill_and_mid_decode_frees_the_slot(model, char_tokenizer):
    engine = make_engine(model, char_tokenizer)
    engine.add_request("long", list(range(2, 28)), greedy(5))  # 26 tokens: 4 steps of prefill
    engine.step()
    assert engine.pool.num_free == 2
    engine.abort("long")
    assert engine.pool.num_free == 3 and not engine.has_unfinished()
    engine.add_request("d", [3, 4], greedy(50))
    for _ in range(4):
        engine.step()
    engine.abort("d")
    assert engine.pool.num_free == 3 and not engine.has_unfinished()


def test_many_short_requests_leave_every_slot_free_and_memory_flat(model, char_tokenizer):
    engine = make_engine(model, char_tokenizer, max_num_seqs=4, max_waiting=2000)
    rng = random.Random(0)

    def burst(start: int, count: int) -> None:
        for i in range(start, start + count):
            prompt = [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 6))]
            engine.add_request(f"q{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 3)))
        while engine.has_unfinished():
            engine.step()

    burst(0, 100)
    rss_before = _rss_bytes()
    burst(100, 900)
    assert engine.pool.num_free == 4 and engine.pool.num_used == 0
    assert not engine._seqs and not engine._groups
    assert engine.prefix_cache.bytes_used <= engine.config.prefix_cache_bytes
    assert _rss_bytes() - rss_before < 32 * 2**20


def test_queue_overflow_is_refused_and_nothing_admitted_is_lost(model, char_tokenizer):
    engine = make_engine(model, char_tokenizer, max_waiting=2)
    engine.add_request("a", [3], greedy(2))
    engine.add_request("b", [4], greedy(2))
    with pytest.raises(QueueFullError, match="retry"):
        engine.add_request("c", [5], greedy(2))
    done = run_all(engine)["outputs"]
    assert {k[0] for k in done} == {"a", "b"}
    assert all(outs[-1].finished for outs in done.values())


def test_one_failing_request_does_not_stop_the_others(model, char_tokenizer):
    engine = make_engine(model, char_tokenizer)
    engine.add_request("bad", [3, 4], greedy(5))
    engine.add_request("good", [5, 6], greedy(5))

    def explode(token_ids):
        raise RuntimeError("detokenizer exploded")

    engine._seqs["bad"].detokenizer.add_tokens = explode
    got = run_all(engine)["outputs"]
    assert got["bad", 0][-1].finish_reason == "error"
    assert "exploded" in got["bad", 0][-1].error
    assert len([t for o in got["good", 0] for t in o.token_ids]) == 5
    assert engine.pool.num_free == 3


def test_bad_input_is_refused_with_a_clear_error(model, char_tokenizer):
    engine = make_engine(model, char_tokenizer)
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("x", [3, VOCAB], greedy(1))
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request("x", [], greedy(1))
    engine.add_request("x", [3], greedy(1))
    with pytest.raises(ValueError, match="already"):
        engine.add_request("x", [3], greedy(1))


def test_async_engine_streams_aborts_on_disconnect_and_reports_a_crash(model, char_tokenizer):
    engine = make_engine(model, char_tokenizer)
    async_engine = AsyncEngine(engine).start()

    async def scenario():
        texts = []
        async for out in async_engine.generate("a", [3, 4, 5], greedy(4)):
            texts.append(out)
        assert texts[-1].finished and sum(len(o.token_ids) for o in texts) == 4
        async for _ in async_engine.generate("b", [3, 4, 5], greedy(500)):
            break  # the client goes away mid-stream
        for _ in range(100):
            if engine.pool.num_free == 3 and not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        assert engine.pool.num_free == 3 and not engine.has_unfinished()

        def crash(batch):
            raise RuntimeError("device lost")

        engine.runner.run = crash
        with pytest.raises(EngineDeadError, match="device lost"):
            async for _ in async_engine.generate("c", [3], greedy(2)):
                pass
        assert not async_engine.is_healthy

    try:
        asyncio.run(scenario())
    finally:
        async_engine.shutdown()


def test_offline_llm_generates_like_the_engine(model, char_tokenizer):
    llm = LLM.__new__(LLM)
    llm.engine, llm.tokenizer = make_engine(model, char_tokenizer), char_tokenizer
    results = llm.generate(["abc", "hello"], greedy(4))
    for result in results:
        assert result.outputs[0].token_ids == greedy_alone(model, result.prompt_token_ids, 4)
        assert result.outputs[0].finish_reason == "length"


def test_engine_config_rejects_bad_values():
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int3")
    with pytest.raises(ValueError, match="int4 runs on a CPU only"):
        EngineConfig(dtype="int4", device="cuda")
    assert EngineConfig(dtype="int8").dtype == "int8"  # weight-only int8 (models/quantize.py)
    assert EngineConfig(dtype="int4").dtype == "int4"  # 4-bit groups (models/int4.py)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_the_engine_runs_on_its_configured_threads(model, char_tokenizer):
    before = torch.get_num_threads()
    try:
        engine = make_engine(model, char_tokenizer, threads=1)
        assert torch.get_num_threads() == 1
        engine.add_request("t", prompts(1)[0], greedy(3))
        assert len(run_all(engine)["tokens"]["t", 0]) == 3
        make_engine(model, char_tokenizer)  # threads None: torch's setting stays
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        EngineConfig(threads=0)
