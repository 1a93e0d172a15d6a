"""The engine loop on its own thread, feeding one asyncio stream per request.

The event loop never runs model code: requests and aborts go to the loop thread through an
inbox, outputs come back with `call_soon_threadsafe`. An abort (or a client that goes away)
is applied before the next step, so its slot is free within one step. If the loop itself
crashes, the engine is marked unhealthy and every open stream gets the error.

Session states move between the engine and the store off both the event loop and the engine
thread: a session is loaded (and locked) on an I/O thread before its request enters the engine,
and saved on an I/O thread when it ends; the request's last output reaches its client only
after the save, so a next turn sent anywhere finds the new state.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from server.engine import LLMEngine, RequestOutput, write_session
from server.errors import QueueFullError, ShuttingDownError
from server.prefix_cache import prefix_hashes
from server.request import SamplingParams
from server.state_store import Session

logger = logging.getLogger("lln_serve.engine")


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an error; the server reports unhealthy."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.error: BaseException | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lln-engine", daemon=True)
        self._io = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lln-store")
        engine.session_writer = self._write_session
        engine.prefix_writer = lambda key, snapshot: self._io.submit(
            engine.sessions.put_prefix, key, snapshot
        )

    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._io.shutdown(wait=True, cancel_futures=False)  # pending saves land first
        self.engine.sessions.close()

    @property
    def is_healthy(self) -> bool:
        return self.error is None and self._thread.is_alive() and not self._stopping

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        session_id: str | None = None,
        *,
        return_progress: bool = False,
        prefix_salt: bytes = b"",
        tenant: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs until all its n choices finish (with return_progress,
        prefill progress outputs first). Raises what `LLMEngine.add_request` raises (before any
        output), or EngineDeadError. prefix_salt: the prefix cache's scope (a tenant's); tenant:
        whose request it is (fair scheduling among tenants)."""
        if not self.is_healthy:
            raise EngineDeadError(f"the engine is not running: {self.error!r}")
        if not self.engine.can_accept(params.n):
            raise QueueFullError(self.engine.config.max_waiting)
        loop = asyncio.get_running_loop()
        extra: dict = {"return_progress": True} if return_progress else {}
        if prefix_salt:
            extra["prefix_salt"] = prefix_salt
        if tenant is not None:
            extra["tenant"] = tenant
        if session_id is not None:
            self.engine.precheck(prompt_token_ids, params, session_id)  # before loading
            extra["acquired"] = (await self._acquire(session_id),)
        elif self.engine.sessions.shares_prefixes:
            extra["shared_prefix"] = await self._shared_prefix(prompt_token_ids, prefix_salt)
        stream = _Stream(loop, asyncio.Queue())
        added = loop.create_future()
        self._streams[request_id] = stream
        self._send(("add", request_id, prompt_token_ids, params, session_id, extra, added, loop))
        finished = 0
        try:
            await added
            while finished < params.n:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.session_saved is not None:
                    item.store_error = await asyncio.wrap_future(item.session_saved)
                finished += item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if finished < params.n:
                self.abort(request_id)  # the consumer went away, or an error: free the slots

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def fail_open_requests(self, reason: str) -> int:
        """End every open stream with ShuttingDownError(reason) (each aborts its request as it
        ends). Returns how many there were."""
        streams = list(self._streams.values())
        for stream in streams:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, ShuttingDownError(reason))
        return len(streams)

    async def _acquire(self, session_id: str) -> Session | None:
        """Load and lock a session on an I/O thread; if the caller goes away meanwhile, the
        session is unlocked as soon as it has been taken."""
        store = self.engine.sessions
        future = self._io.submit(store.acquire, session_id)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: self._unlock_if_taken(session_id, f))
            raise

    def _unlock_if_taken(self, session_id: str, future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._io.submit(self.engine.sessions.abandon, session_id, future.result())

    async def _shared_prefix(self, prompt: list[int], salt: bytes = b""):
        """The longest prefix state of the prompt in the shared store, unless this process
        caches it already: (block index, state) or None."""
        cache = self.engine.prefix_cache
        if cache.max_bytes == 0:
            return None
        usable = prefix_hashes(prompt, cache.block, salt)[: (len(prompt) - 1) // cache.block]
        if not usable or usable[-1] in cache:
            return None
        return await asyncio.wrap_future(self._io.submit(self.engine.sessions.get_prefix, usable))

    def _write_session(
        self, request_id: str, session_id: str, action: str, session: Session | None
    ) -> Future:
        return self._io.submit(write_session, self.engine.sessions, session_id, action, session)

    def _send(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wake.set()

    # ---- the loop thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if self.engine.has_unfinished():
                    self._dispatch(self.engine.step())
                else:
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
        except BaseException as error:
            logger.exception("the engine loop crashed")
            self.error = error
            dead = EngineDeadError(f"the engine loop crashed: {type(error).__name__}: {error}")
            for stream in list(self._streams.values()):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, dead)

    def _drain_inbox(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "abort":
                self.engine.abort(message[1])
                continue
            _, request_id, prompt, params, session_id, extra, added, loop = message
            try:
                self.engine.add_request(request_id, prompt, params, session_id, **extra)
            except Exception as error:  # bad input, queue full, session busy: the caller's
                loop.call_soon_threadsafe(_settle, added, error)
            else:
                loop.call_soon_threadsafe(_settle, added, None)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, output)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
