"""`lln-serve serve`: start listening at once (health answers 503 "loading"), prepare the model
and warm up the engine in the background, then serve. If the model cannot be loaded the
server exits with the reason and a non-zero status."""

from __future__ import annotations

import logging
import sys
import threading

import uvicorn

from server.api import ServerState, build_app
from server.async_engine import AsyncEngine
from server.config import EngineConfig, ServerConfig
from server.engine import LLMEngine
from server.metrics import Metrics
from server.request import SamplingParams

logger = logging.getLogger("lln_serve")


def serve(engine_config: EngineConfig, server_config: ServerConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    name = server_config.served_model_name or engine_config.model
    state = ServerState(
        model_names=[name],
        api_key=server_config.api_key,
        max_body_bytes=server_config.max_body_bytes,
        ui=server_config.ui,
    )
    app = build_app(state, list(server_config.cors_origins))
    server = uvicorn.Server(
        uvicorn.Config(app, host=server_config.host, port=server_config.port, log_level="info")
    )
    loader = threading.Thread(
        target=_load, args=(state, engine_config, name, server), name="lln-loader", daemon=True
    )
    loader.start()
    server.run()
    if state.engine is not None:
        state.engine.shutdown()
    if state.loading_error is not None:
        print(f"lln-serve serve: error: {state.loading_error}", file=sys.stderr)
        return 1
    return 0


def _load(state: ServerState, config: EngineConfig, name: str, server: uvicorn.Server) -> None:
    try:
        logger.info("preparing model %s (first use converts it: about two minutes)", config.model)
        engine = LLMEngine(config)
        logger.info("warming up the engine (compiles the decode step)")
        warm_up(engine)
        state.metrics = Metrics(engine, name)
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
