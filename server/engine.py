"""The engine: step() = schedule -> run -> sample -> postprocess, over a fixed pool of slots.

`LLMEngine` is synchronous (one caller thread); `AsyncEngine` (server/async_engine.py) runs its
loop off the event loop. Requests enter by `add_request`, leave as `RequestOutput`s (one per
step that produced something), and always give their slot back, whatever ends them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from models.modeling_lln import LLNForCausalLM
from models.quantize import batch_invariance_is_free, set_batch_invariant
from server.config import EngineConfig
from server.detokenizer import IncrementalDetokenizer
from server.errors import QueueFullError
from server.guided import GuidedDecoding
from server.prefix_cache import PrefixCache, Snapshot, prefix_hashes
from server.request import Request, RequestStatus, SamplingParams
from server.runner import ModelRunner, RunnerOutput
from server.sampler import Sampler, SamplerOutput, compute_logprobs
from server.scheduler import PrefillChunk, ScheduledBatch, Scheduler
from server.state_pool import StatePool, snapshot_bytes
from server.state_store import (
    Session,
    StoreUnavailableError,
    open_store,
    redis_options,
    state_tag,
)

logger = logging.getLogger("lln_serve.engine")


@dataclass
class TokenLogprob:
    """A token's raw logprob and the top alternatives at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestMetrics:
    """Monotonic timestamps of one sequence (time.monotonic seconds)."""

    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


@dataclass
class PromptProgress:
    """How far a prompt's prefill has got (llama.cpp's `prompt_progress`): the context's
    tokens in all (a session's history included), those taken from a saved state (prefix cache
    or session), those in the state so far (cached ones included), ms since it got its slot."""

    total: int
    cache: int
    processed: int
    time_ms: float


@dataclass
class RequestOutput:
    """What one step produced for one sequence: new text and tokens, or its end.

    index: the choice (0..n-1) of request `request_id`. prompt_logprobs is set once, in the
    output that follows the prompt's prefill (None for its first token).
    """

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    metrics: RequestMetrics
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None
    emitted: float = field(default_factory=time.monotonic)
    # a session's final output: the store write of its new state (result: None or an error
    # message); the client hears of the end only once the state is saved
    session_saved: Future | None = None
    store_error: str | None = None
    # a prefill step's progress (requests that asked for it): no text, tokens nor end
    progress: PromptProgress | None = None


@dataclass(eq=False)
class _Sequence:
    """Engine-side bookkeeping of one Request (one choice of an API request)."""

    request: Request
    api_id: str
    index: int
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    metrics: RequestMetrics
    hashes: list[bytes] = field(default_factory=list)  # prefix hashes (prefix cache)
    restore: Snapshot | None = None  # state to load when admitted (session or fork)
    num_cached_tokens: int = 0
    session_id: str | None = None
    session: Session | None = None  # as acquired, put back if the request fails
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    forked: bool = False
    matcher: object | None = None  # llguidance.LLMatcher of a structured output
    session_saved: Future | None = None
    return_progress: bool = False
    history: int = 0  # tokens the state held before this prompt (a continued session's)


class LLMEngine:
    """Serves one model. Not thread-safe: one thread calls add_request / abort / step."""

    def __init__(
        self,
        config: EngineConfig,
        model: LLNForCausalLM | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither")
        if model is None:
            model, tokenizer = _load(config)
        self.config = config
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.model, self.tokenizer = model, tokenizer
        self.deterministic = config.deterministic
        if self.deterministic is None:
            self.deterministic = batch_invariance_is_free(model)
        logger.info("deterministic inference: %s", "on" if self.deterministic else "off")
        set_batch_invariant(model, self.deterministic)
        if config.compile_decode:
            model.compile_decode(cpp_wrapper=torch.device(config.device).type == "cpu")
        self.pool = StatePool(model, config.max_num_seqs)
        self.scheduler = Scheduler(
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.max_waiting,
            self.pool.allocate,
            self.pool.free,
            prefill_chunk_size=config.prefill_chunk_size,
            on_admit=self._on_admit,
            whole_chunks=self.deterministic,
        )
        device = model.lm_head.weight.device
        use_graphs = device.type == "cuda" and not config.enforce_eager
        self.runner = ModelRunner(
            model, self.pool, use_graphs=use_graphs, chunk_alone=self.deterministic
        )
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.sampler = Sampler(self.eos_token_ids, seed=config.seed, device=device)
        self.guided = GuidedDecoding(tokenizer, model.config.vocab_size)
        self.prefix_cache = PrefixCache(
            config.prefill_chunk_size, config.prefix_cache_bytes, snapshot_bytes
        )
        self.state_template: Snapshot = model.empty_states(1)
        self.state_tag = state_tag(model, config.model, self.state_template)
        self.sessions = open_store(
            config.state_store, self.state_tag, self.state_template,
            max_bytes=config.session_bytes, ttl_s=config.session_ttl_s,
            lock_ttl_s=config.session_lock_ttl_s, share_prefixes=config.share_prefix_states,
            options=_store_options(config),
        )  # fmt: skip
        # store writes: done at once here; AsyncEngine moves them off the engine thread
        self.session_writer: SessionWriter = self._write_now
        self.prefix_writer: Callable[[bytes, Snapshot], None] = self.sessions.put_prefix
        self._seqs: dict[str, _Sequence] = {}
        self._groups: dict[str, list[str]] = {}
        self.num_prefill_tokens = 0  # prompt tokens actually computed (cache hits excluded)

    # ---- requests in and out -------------------------------------------------------------

    def can_accept(self, num_requests: int = 1) -> bool:
        return self.scheduler.can_accept(num_requests)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        session_id: str | None = None,
        *,
        acquired: tuple[Session | None] | None = None,
        shared_prefix: tuple[int, Snapshot] | None = None,
        return_progress: bool = False,
        prefix_salt: bytes = b"",
        tenant: str | None = None,
    ) -> None:
        """Queue a request (n choices). Raises ValueError for bad input, QueueFullError when
        the waiting queue is full, SessionError for a session that cannot be continued,
        StoreUnavailableError when the session store cannot be reached.

        acquired: the session's state, already taken from the store by the caller (a 1-tuple;
        AsyncEngine loads it off this thread). shared_prefix: (block index, state) of a prefix
        state fetched from a shared store, put in the prefix cache first. return_progress: an
        output with `progress` after every step that advanced the prompt's prefill.
        prefix_salt: the prefix cache's scope (`prefix_hashes`): only prompts under the same
        salt share cached states. tenant: whose request it is (the scheduler shares steps fairly
        among tenants)."""
        try:
            if request_id in self._groups:
                raise ValueError(f"request_id {request_id!r} is already in the engine")
            self.precheck(prompt_token_ids, params, session_id)
        except Exception:
            if acquired is not None:
                self._session_done(request_id, session_id, "abandon", acquired[0])
            raise
        if session_id is None:
            session = None
        elif acquired is not None:
            session = acquired[0]
        else:
            session = self.sessions.acquire(session_id)
        try:  # a session's context holds its history too
            history = session.num_tokens if session is not None else 0
            params = self._bounded(params, history + len(prompt_token_ids))
        except Exception:
            if session_id is not None:
                self._session_done(request_id, session_id, "abandon", session)
            raise
        prompt = [*(session.pending if session else ()), *prompt_token_ids]
        seq = self._new_sequence(request_id, 0, prompt, params)
        seq.request.tenant = tenant
        seq.session_id, seq.session = session_id, session
        seq.return_progress = return_progress
        if session is not None:
            seq.restore = session.snapshot
            seq.num_cached_tokens = seq.history = session.num_tokens - len(session.pending)
        elif session_id is None:
            seq.hashes = prefix_hashes(prompt, self.prefix_cache.block, prefix_salt)
            if shared_prefix is not None and shared_prefix[0] < len(seq.hashes):
                index, snapshot = shared_prefix
                end = (index + 1) * self.prefix_cache.block
                self.prefix_cache.insert(seq.hashes, end, snapshot)
        self.scheduler.add(seq.request)
        self._groups[request_id] = [seq.request.request_id]

    def precheck(self, prompt: list[int], params: SamplingParams, session_id: str | None) -> None:
        """ValueError / QueueFullError for a request refused whatever its session holds
        (checked before a session is loaded)."""
        self._check_prompt(prompt)
        if session_id is not None and params.n != 1:
            raise ValueError("a request with a session_id must have n = 1")
        vocab = self.model.config.vocab_size
        if any(token >= vocab for token, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be below the vocabulary size {vocab}")
        self.check_admissible(1, params.n)
        if not self.scheduler.can_accept():
            raise QueueFullError(self.config.max_waiting)

    def check_admissible(self, num_prompts: int, n: int) -> None:
        """Raise ValueError for work that could never be admitted, whatever the load."""
        if n > self.config.max_num_seqs:
            raise ValueError(
                f"n ({n}) is more than this server's {self.config.max_num_seqs} sequence slots"
                " (--max-num-seqs): such a request could never run"
            )
        if num_prompts * n > self.config.max_waiting:
            raise ValueError(
                f"{num_prompts} prompts x n {n} = {num_prompts * n} sequences is more than the "
                f"{self.config.max_waiting} this server queues (--max-waiting)"
            )

    def _bounded(self, params: SamplingParams, context_tokens: int) -> SamplingParams:
        """params with max_tokens set (the server's default when absent), checked against
        max_model_len for a sequence that already holds `context_tokens` tokens."""
        limit = self.config.max_model_len
        if context_tokens >= limit:
            raise ValueError(
                f"the prompt has {context_tokens} tokens; this server's limit (--max-model-len)"
                f" is {limit} tokens of prompt and generation together"
            )
        if params.max_tokens is None:
            room = limit - context_tokens
            return dataclasses.replace(params, max_tokens=min(self.config.default_max_tokens, room))
        if context_tokens + params.max_tokens > limit:
            raise ValueError(
                f"the prompt's {context_tokens} tokens plus max_tokens {params.max_tokens} is "
                f"{context_tokens + params.max_tokens}, over this server's limit "
                f"(--max-model-len) of {limit} tokens"
            )
        return params

    def abort(self, request_id: str) -> None:
        """Abort every choice of a request; its slots are free when this returns."""
        for internal_id in self._groups.pop(request_id, []):
            seq = self._seqs.pop(internal_id, None)
            if seq is not None:
                self.scheduler.abort(internal_id)
                self._release_session(seq, keep_new_state=False)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        result = self.runner.run(batch)
        self.scheduler.update_after_step(batch)
        self.num_prefill_tokens += sum(c.num_tokens for c in batch.prefills)
        self._after_prefill(batch, result)
        progress = [self._progress(chunk) for chunk in batch.prefills]
        outputs = [out for out in progress if out is not None]
        return outputs + self._sample_and_postprocess(batch, result.logits)

    def _after_prefill(self, batch: ScheduledBatch, result: RunnerOutput) -> None:
        """Prefix-cache snapshots at block boundaries; prompt logprobs of the chunks."""
        for chunk in batch.prefills:
            seq = self._seqs[chunk.request.request_id]
            if seq.hashes and self.prefix_cache.wants(seq.hashes, chunk.end):
                snapshot = self.pool.snapshot(chunk.request.slot)
                self.prefix_cache.insert(seq.hashes, chunk.end, snapshot)
                if self.sessions.shares_prefixes:
                    self.prefix_writer(seq.hashes[chunk.end // self.prefix_cache.block - 1],
                                       snapshot)  # fmt: skip
            logits = result.prompt_logits.get(chunk.request.request_id)
            if logits is not None:
                self._add_prompt_logprobs(seq, chunk.start, chunk.end, logits)

    def _progress(self, chunk: PrefillChunk) -> RequestOutput | None:
        """The progress output of a prefill chunk just computed, if its request asked; it goes
        before the step's tokens, so a prompt's last one precedes its first token."""
        seq = self._seqs[chunk.request.request_id]
        if not seq.return_progress:
            return None
        started = seq.metrics.scheduled or seq.metrics.arrival
        out = self._output(seq, "", finished=False)
        out.progress = PromptProgress(
            total=seq.history + chunk.request.num_prompt_tokens,
            cache=seq.num_cached_tokens,
            processed=seq.history + chunk.end,
            time_ms=round((time.monotonic() - started) * 1000, 3),
        )
        return out

    def _sample_and_postprocess(self, batch: ScheduledBatch, logits: Tensor) -> list[RequestOutput]:
        seqs, rows = [], []
        outputs = []
        for row, request in enumerate(batch.sampling_requests):
            seq = self._seqs[request.request_id]
            if request.sampling_params.max_tokens == 0:
                outputs.append(self._finish(seq, RequestStatus.FINISHED_LENGTH, ""))
                continue
            seqs.append(seq)
            rows.append(row)
            if request.sampling_params.n > 1 and not seq.forked:
                seq.forked = True
                for child in self._fork(seq):
                    seqs.append(child)
                    rows.append(row)
        if not seqs:
            return outputs
        if rows != list(range(len(logits))):  # forks repeat rows, finished ones drop out
            logits = logits[rows]
        sampled = self.sampler(
            logits,
            [s.request.sampling_params for s in seqs],
            [s.request.prompt_token_ids for s in seqs],
            [s.request.output_token_ids for s in seqs],
            [s.generator for s in seqs],
            self.guided.allowed([s.matcher for s in seqs], logits.device),
        )
        sampled = sampled.to_host()
        token_ids = sampled.token_ids.tolist()
        for i, seq in enumerate(seqs):
            try:
                outputs.append(self._postprocess(seq, token_ids[i], sampled, i))
            except Exception as error:  # one request's failure must not stop the others
                logger.exception("request %s failed in postprocessing", seq.api_id)
                outputs.append(self._fail(seq, f"{type(error).__name__}: {error}"))
        return outputs

    def _postprocess(
        self, seq: _Sequence, token_id: int, sampled: SamplerOutput, row: int
    ) -> RequestOutput:
        request, params = seq.request, seq.request.sampling_params
        now = time.monotonic()
        if seq.metrics.first_token is None:
            seq.metrics.first_token = now
        seq.metrics.last_token = now
        is_first_output = not request.output_token_ids
        request.append_output_token(token_id)
        logprobs = None
        if params.logprobs is not None:
            logprob, top = sampled.row_logprobs(row, params.logprobs)
            logprobs = [TokenLogprob(token_id, logprob, top)]
        status, text = None, ""
        if seq.matcher is not None and not seq.matcher.consume_token(token_id):
            raise RuntimeError(f"structured output: {seq.matcher.get_error()}")
        if token_id in self.eos_token_ids and not params.ignore_eos:
            status = RequestStatus.FINISHED_STOPPED
        elif token_id in params.stop_token_ids:
            status = RequestStatus.FINISHED_STOPPED
            if params.include_stop_str_in_output:
                text, _ = seq.detokenizer.add_tokens(token_id)
        else:
            text, stopped = seq.detokenizer.add_tokens(token_id)
            if stopped:
                status = RequestStatus.FINISHED_STOPPED
        if status is None and seq.matcher is not None and seq.matcher.is_stopped():
            status = RequestStatus.FINISHED_STOPPED  # the output is complete: only EOS is left
        max_tokens = params.max_tokens
        if status is None and max_tokens is not None and request.num_output_tokens >= max_tokens:
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            out = self._finish(seq, status, text)
        else:
            out = self._output(seq, text, finished=False)
        out.token_ids, out.logprobs = [token_id], logprobs
        if is_first_output:
            out.prompt_logprobs = self._take_prompt_logprobs(seq)
        return out

    # ---- endings --------------------------------------------------------------------------

    def _finish(self, seq: _Sequence, status: RequestStatus, text: str) -> RequestOutput:
        if status is not RequestStatus.FINISHED_STOPPED or not seq.detokenizer.stopped:
            text += seq.detokenizer.flush()
        self._release_session(seq, keep_new_state=True)
        self.scheduler.finish(seq.request, status)
        seq.metrics.finished = time.monotonic()
        self._forget(seq)
        out = self._output(seq, text, finished=True)
        out.prompt_logprobs = self._take_prompt_logprobs(seq)
        out.session_saved = seq.session_saved
        if out.session_saved is not None and out.session_saved.done():
            out.store_error = out.session_saved.result()
        return out

    def _fail(self, seq: _Sequence, message: str) -> RequestOutput:
        self._release_session(seq, keep_new_state=False)
        self.scheduler.finish(seq.request, RequestStatus.FINISHED_ERROR)
        seq.metrics.finished = time.monotonic()
        self._forget(seq)
        out = self._output(seq, "", finished=True)
        out.error = message
        return out

    def _forget(self, seq: _Sequence) -> None:
        self._seqs.pop(seq.request.request_id, None)
        siblings = self._groups.get(seq.api_id)
        if siblings is not None:
            if seq.request.request_id in siblings:
                siblings.remove(seq.request.request_id)
            if not siblings:
                del self._groups[seq.api_id]

    def _release_session(self, seq: _Sequence, *, keep_new_state: bool) -> None:
        """A session gets its state after every token but the last sampled one (which the
        next request prefills first); after a failure or abort it keeps its old state."""
        if seq.session_id is None:
            return
        session_id, seq.session_id = seq.session_id, None
        request = seq.request
        if not keep_new_state or request.slot is None or not request.is_prefill_done:
            self._session_done(seq.api_id, session_id, "abandon", seq.session)
            return
        snapshot = self.pool.snapshot(request.slot)
        pending = request.output_token_ids[-1:]
        num_tokens = int(snapshot[0].num_tokens[0]) + len(pending)
        session = Session(snapshot, pending, num_tokens, snapshot_bytes(snapshot))
        seq.session_saved = self._session_done(seq.api_id, session_id, "release", session)

    def _session_done(
        self, request_id: str, session_id: str, action: str, session: Session | None
    ) -> Future:
        return self.session_writer(request_id, session_id, action, session)

    def _write_now(
        self, request_id: str, session_id: str, action: str, session: Session | None
    ) -> Future:
        """Release (save) or abandon a session in the store, here and now."""
        done: Future = Future()
        done.set_result(write_session(self.sessions, session_id, action, session))
        return done

    # ---- helpers --------------------------------------------------------------------------

    def _on_admit(self, request: Request) -> None:
        """Right after a request gets its slot: load its session or forked state, or the
        longest cached prefix of its prompt."""
        seq = self._seqs[request.request_id]
        seq.metrics.scheduled = time.monotonic()
        if seq.restore is not None:
            self.pool.restore(request.slot, seq.restore)
            seq.restore = None
            return
        if not seq.hashes or request.sampling_params.prompt_logprobs is not None:
            return  # a session continues its own state; prompt logprobs need every position
        hit = self.prefix_cache.lookup(seq.hashes, request.num_prompt_tokens)
        if hit is not None:
            length, snapshot = hit
            self.pool.restore(request.slot, snapshot)
            request.num_computed_tokens = length
            seq.num_cached_tokens = length

    def _fork(self, parent: _Sequence) -> list[_Sequence]:
        """Choices 1..n-1 of a request whose prompt was just prefilled: each starts from a copy
        of the parent's state (one state each, not a KV cache) and waits for a slot."""
        snapshot = self.pool.snapshot(parent.request.slot)
        params = parent.request.sampling_params
        children = []
        for index in range(1, params.n):
            child = self._new_sequence(
                parent.api_id, index, parent.request.prompt_token_ids, params
            )
            child.restore, child.forked = snapshot, True
            child.request.tenant = parent.request.tenant
            child.num_cached_tokens = parent.num_cached_tokens
            child.request.num_computed_tokens = parent.request.num_prompt_tokens
            child.prompt_logprobs = parent.prompt_logprobs
            child.metrics.first_token = None
            self.scheduler.add_forked(child.request)
            self._groups[parent.api_id].append(child.request.request_id)
            children.append(child)
        return children

    def _new_sequence(
        self, api_id: str, index: int, prompt: list[int], params: SamplingParams
    ) -> _Sequence:
        internal_id = api_id if index == 0 else f"{api_id}#{index}"
        seed = params.seed
        generator = None if seed is None else self.sampler.make_generator(seed + index)
        seq = _Sequence(
            request=Request(internal_id, prompt, params),
            api_id=api_id,
            index=index,
            detokenizer=IncrementalDetokenizer.from_params(self.tokenizer, params),
            generator=generator,
            metrics=RequestMetrics(arrival=time.monotonic()),
            matcher=None if params.guided is None else self.guided.matcher(params.guided),
        )
        self._seqs[internal_id] = seq
        return seq

    def _output(self, seq: _Sequence, text: str, *, finished: bool) -> RequestOutput:
        request = seq.request
        return RequestOutput(
            request_id=seq.api_id,
            index=seq.index,
            text=text,
            token_ids=[],
            finished=finished,
            finish_reason=request.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            metrics=seq.metrics,
        )

    def _add_prompt_logprobs(self, seq: _Sequence, start: int, end: int, logits: Tensor) -> None:
        """Chunk logits at positions [start, end) score prompt tokens [start + 1, end + 1)."""
        prompt = seq.request.prompt_token_ids
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]
        targets = prompt[start + 1 : end + 1]
        if not targets:
            return
        num_top = seq.request.sampling_params.prompt_logprobs or 0
        ids = torch.tensor(targets, device=logits.device)
        chosen, top_ids, top_values = compute_logprobs(logits[: len(targets)], ids, max(num_top, 1))
        for i, token in enumerate(targets):
            top = list(
                zip(top_ids[i, :num_top].tolist(), top_values[i, :num_top].tolist(), strict=True)
            )
            seq.prompt_logprobs.append(TokenLogprob(token, float(chosen[i]), top))

    def _take_prompt_logprobs(self, seq: _Sequence) -> list[TokenLogprob | None] | None:
        if seq.prompt_logprobs is None or seq.prompt_logprobs_sent:
            return None
        seq.prompt_logprobs_sent = True
        return seq.prompt_logprobs

    def _check_prompt(self, prompt_token_ids: list[int]) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt must contain at least one token")
        vocab = self.model.config.vocab_size
        for token in prompt_token_ids:
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise ValueError(
                    f"prompt token ids must be integers in [0, {vocab}), got {token!r}"
                )

    # ---- state for metrics ----------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def live_context_lengths(self) -> list[int]:
        """Tokens held by each running sequence's state (read from the state itself, so a
        restored session or prefix counts in full)."""
        slots = [r.slot for r in list(self.scheduler.running) if r.slot is not None]
        return self.pool.context_lengths(slots)


SessionWriter = Callable[[str, str, str, "Session | None"], Future]


def write_session(store, session_id: str, action: str, session: Session | None) -> str | None:
    """store.release (action 'release') or store.abandon; None, or why the state was not
    saved (the previous turn's state stays)."""
    from server.state_store import SessionError

    try:
        if action == "release":
            store.release(session_id, session)
        else:
            store.abandon(session_id, session)
    except (StoreUnavailableError, SessionError) as error:
        logger.warning("session %r: state not saved: %s", session_id, error)
        return f"the session state was not saved: {error}"
    except Exception as error:  # never leave a caller waiting on a failed write
        logger.exception("session %r: state not saved", session_id)
        return f"the session state was not saved: {type(error).__name__}: {error}"
    return None


def _store_options(config: EngineConfig) -> dict | None:
    if not config.uses_redis:
        return None
    return redis_options(config.state_store_password_file, config.state_store_ca_cert,
                         config.state_store_cert, config.state_store_key)  # fmt: skip


def _load(config: EngineConfig) -> tuple[LLNForCausalLM, PreTrainedTokenizerBase]:
    from models.registry import load_model

    dtype = getattr(torch, config.weight_dtype)
    return load_model(
        config.model, dtype=dtype, device=config.device, gemm_dtype=gemm_dtype(config)
    )


def gemm_dtype(config: EngineConfig) -> torch.dtype | None:
    from models.quantize import resolve_gemm_dtype

    return resolve_gemm_dtype(config.gemm_dtype, config.weight_dtype, config.device)


def _eos_ids(model: LLNForCausalLM, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    ids = set()
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return tuple(sorted(ids))
