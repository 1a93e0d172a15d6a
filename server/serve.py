"""`lln-serve serve`: start listening at once (health answers 503 "loading"), prepare the model
and warm up the engine in the background, then serve. If the model cannot be loaded the
server exits with the reason and a non-zero status."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import threading

import uvicorn

from server.api import ServerState, build_app
from server.async_engine import AsyncEngine
from server.config import EngineConfig, ServerConfig
from server.engine import LLMEngine
from server.metrics import Metrics
from server.request import SamplingParams
from server.tenants import KeysFileError, TenantRegistry

logger = logging.getLogger("lln_serve")
STREAM_GRACE_S = 2.0  # after the bound, for the failed requests to send their error and end


class BoundedShutdownServer(uvicorn.Server):
    """uvicorn, whose graceful shutdown (SIGINT, SIGTERM) waits at most `bound` seconds for
    open requests: then they end with a 503 error (a stream: an error event, then [DONE]) and
    their sequences are aborted. uvicorn cancels whatever is still open STREAM_GRACE_S later."""

    def __init__(self, config: uvicorn.Config, state: ServerState, bound: float) -> None:
        super().__init__(config)
        self.state, self.bound = state, bound

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        timer = asyncio.get_running_loop().call_later(self.bound, self.fail_open_requests)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def fail_open_requests(self) -> None:
        if self.state.engine is None:
            return
        reason = f"the server is shutting down (open requests end after {self.bound:g} s)"
        count = self.state.engine.fail_open_requests(reason)
        if count:
            logger.warning("shutdown: %d open request(s) ended after %g s", count, self.bound)


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    name = server_config.served_model_name or engine_config.model
    try:
        tenants = TenantRegistry(server_config.api_key, server_config.api_keys_file)
    except KeysFileError as error:
        print(f"lln-serve serve: error: --api-keys-file {error}", file=sys.stderr)
        return 2
    state = ServerState(
        model_names=[name],
        api_key=server_config.api_key,
        max_body_bytes=server_config.max_body_bytes,
        ui=server_config.ui,
        tenants=tenants,
    )
    app = build_app(state, list(server_config.cors_origins))
    bound = server_config.shutdown_timeout_s
    config = uvicorn.Config(
        app, host=server_config.host, port=server_config.port, log_level="info",
        timeout_graceful_shutdown=bound + STREAM_GRACE_S,
    )  # fmt: skip
    server = BoundedShutdownServer(config, state, bound)
    loader = threading.Thread(
        target=_load, args=(state, engine_config, name, server, server_config.max_tenant_labels),
        name="lln-loader", daemon=True,
    )  # fmt: skip
    loader.start()
    _reload_keys_on_sighup(tenants)
    _run_until_stopped(server)
    if state.engine is not None:
        state.engine.shutdown()
    if state.loading_error is not None:
        print(f"lln-serve serve: error: {state.loading_error}", file=sys.stderr)
        return 1
    return 0


class _Stopped(Exception):
    pass


def _stop(_signum: int, _frame) -> None:
    raise _Stopped


def _run_until_stopped(server: uvicorn.Server) -> None:
    """Run uvicorn; the SIGINT or SIGTERM it handled (and raises again once done) ends the run
    here, so that the engine still shuts down (pending session saves land) and the exit is 0."""
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _reload_keys_on_sighup(tenants: TenantRegistry) -> None:
    """SIGHUP reads the keys file again; requests in flight keep going (the table is swapped
    whole), and a file that does not parse leaves the keys in force."""
    if tenants.keys_file is None or not hasattr(signal, "SIGHUP"):
        return

    def reload(_signum: int, _frame) -> None:
        try:
            count = tenants.reload()
        except KeysFileError as error:
            logger.error("SIGHUP: the keys file was not reloaded, the old keys stay: %s", error)
            return
        logger.info("SIGHUP: %d API keys in force from %s", count, tenants.keys_file)

    signal.signal(signal.SIGHUP, reload)


def _load(
    state: ServerState, config: EngineConfig, name: str, server: uvicorn.Server,
    max_tenant_labels: int = 100,
) -> None:  # fmt: skip
    try:
        # the registry says so itself when a model must be prepared first (first use: minutes)
        logger.info("loading model %s", config.model)
        engine = LLMEngine(config)
        logger.info("warming up the engine (compiles the decode step)")
        warm_up(engine)
        state.metrics = Metrics(engine, name, max_tenant_labels)
        state.engine = AsyncEngine(engine).start()
        logger.info("ready: model %s, %d slots of %.2f MiB", name, engine.pool.num_slots,
                    engine.pool.bytes_per_slot / 2**20)  # fmt: skip
    except Exception as error:
        logger.error("the model could not be loaded: %s", error)
        state.loading_error = f"{type(error).__name__}: {error}"
        server.should_exit = True


def warm_up(engine: LLMEngine) -> None:
    """Decode at batch 1 and 2 once, so that the first requests do not wait for compilation."""
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    engine.add_request("warm-up-0", [1, 2, 3], params)
    engine.step()
    engine.add_request("warm-up-1", [4, 5, 6], params)
    while engine.has_unfinished():
        engine.step()
    engine.num_prefill_tokens = 0
