"""FastAPI app: OpenAI-compatible routes, SSE streaming, API keys, errors, health, metrics.

Every error is `{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status; a
failure after a stream started is sent as an error event, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from lln_core.state import kv_cache_bytes
from server.async_engine import AsyncEngine, EngineDeadError
from server.engine import RequestOutput, TokenLogprob
from server.errors import QueueFullError, ShuttingDownError
from server.metrics import Metrics
from server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ResponseFunctionCall,
    ResponseToolCall,
    SessionDeleted,
    SessionInfo,
    SessionObject,
    StateInfo,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    TopLogprob,
    Usage,
    new_id,
    unsupported_field,
)
from server.rate_limits import RateLimited, RateLimiter, TooLarge
from server.state_store import SessionError, StoreUnavailableError
from server.state_store import SessionInfo as StoredSession
from server.tenant_http import TENANT_KEY, LeaseMiddleware, hold, scope_tenant
from server.tenants import Tenant, TenantRegistry
from server.tokenization import InputError, detokenize, tokenize, tokenize_schema
from server.tool_stream import CallDelta, Reply, merge
from server.tools import ChatPlan, ToolError, plan_chat

logger = logging.getLogger("lln_serve.api")
VERSION = "0.1.0"
STATIC_DIR = Path(__file__).parent / "static"
# the playground loads nothing from elsewhere and talks only to this server
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


class APIError(Exception):
    """An error answer; its body's `code` is the HTTP status, as vLLM's (always an integer)."""

    def __init__(self, status: int, message: str, type_: str, param=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param
        self.headers = headers or {}


@dataclass
class ServerState:
    """What the routes need; `engine` is None while the model loads (health answers 503).
    tenants: who the keys belong to (default: `api_key` alone, or open without it)."""

    model_names: list[str]
    api_key: str | None = None
    max_body_bytes: int = 4 * 2**20
    engine: AsyncEngine | None = None
    metrics: Metrics | None = None
    loading_error: str | None = None
    ui: bool = True  # serve the playground at `/` (`--no-ui`: 404)
    tenants: TenantRegistry | None = None
    limiter: RateLimiter = field(default_factory=RateLimiter)

    def __post_init__(self) -> None:
        if self.tenants is None:
            self.tenants = TenantRegistry(self.api_key)


def build_app(state: ServerState, cors_origins: list[str] | None = None) -> FastAPI:
    app = FastAPI(title="lln-serve", version=VERSION, separate_input_output_schemas=False)
    app.state.server = state
    # added first, so inside CORS: its early refusals carry the CORS headers too
    app.add_middleware(LeaseMiddleware, limiter=state.limiter, refuse=_early_refusal(state))
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    _add_error_handlers(app)
    _add_routes(app, state)
    if state.ui:
        _add_playground(app)
    _add_request_schemas(app)
    return app


# ---- the OpenAPI document --------------------------------------------------------------------

_ERRORS = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in [
        (400, "invalid request"), (401, "missing or wrong API key"),
        (404, "unknown model, or no such session (of this tenant)"),
        (409, "session in use, evicted, or saved by another model"), (413, "body too large"),
        (429, "over the tenant's rate limit (Retry-After, x-ratelimit-* headers)"),
        (503, "overloaded (Retry-After) or not ready"),
    ]
}  # fmt: skip


def _documented(request_model, response_model, stream: bool = True) -> dict:
    """Route arguments that document a body the route parses itself (to bound its size
    first): the request schema (a tuple of models: one of them), the JSON response, the SSE
    stream and the errors."""
    models = request_model if isinstance(request_model, tuple) else (request_model,)
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in models]
    body = refs[0] if len(refs) == 1 else {"oneOf": refs}
    events = {"type": "string", "description": "with stream: true, chunks as SSE events"}
    ok = {200: {"content": {"text/event-stream": {"schema": events}}}} if stream else {}
    return dict(
        response_model=response_model,
        responses={**ok, **_ERRORS},
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": body}}}
        },
    )


_TOKENIZE_BODY = (TokenizeCompletionRequest, TokenizeChatRequest)
_REQUEST_MODELS = (CompletionRequest, ChatCompletionRequest, *_TOKENIZE_BODY, DetokenizeRequest)


def _add_request_schemas(app: FastAPI) -> None:
    """Put the request bodies' JSON schemas in the OpenAPI components (the routes refer to
    them by name), with the models they nest."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = build()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for model in _REQUEST_MODELS:
            schema = model.model_json_schema(
                ref_template="#/components/schemas/{model}", by_alias=True
            )
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        app.openapi_schema = document
        return document

    app.openapi = openapi


def _error_body(status: int, message: str, type_: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def _error_response(error: APIError) -> JSONResponse:
    body = _error_body(error.status, error.message, error.type, error.param)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, error: APIError):
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError):
        return _invalid(error.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException):
        type_ = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        body = _error_body(error.status_code, str(error.detail), type_)
        return JSONResponse(body, status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, error: Exception):
        logger.exception("unhandled error")
        body = _error_body(500, f"internal error: {type(error).__name__}", "internal_error")
        return JSONResponse(body, status_code=500)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _invalid(errors: list) -> JSONResponse:
    # a field that takes several types fails once per type: report the failure of the type
    # the value had (a too-long list), not "should be a string"
    ranked = sorted(errors, key=lambda e: str(e.get("type", "")).endswith("_type"))
    first = ranked[0] if ranked else {}
    loc = [
        str(x) for x in first.get("loc", ())
        if x != "body" and not (isinstance(x, str) and ("[" in x or x in _UNION_TAGS))
    ]  # fmt: skip
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if param:
        message = f"{param}: {message}"
    return JSONResponse(_error_body(400, message, "invalid_request_error", param), 400)


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health")
    async def health():
        if state.engine is not None and state.engine.is_healthy:
            return _store_health(state.engine.engine.sessions)
        status = "loading" if state.engine is None and not state.loading_error else "unhealthy"
        return JSONResponse({"status": status, "error": state.loading_error}, status_code=503)

    @app.get("/version")
    async def version():
        return {"version": VERSION}

    @app.get("/metrics")
    async def metrics():
        if state.metrics is None:
            return Response(b"", media_type="text/plain; version=0.0.4")
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models(request: Request):
        _authorize(request, state)
        return ModelList(data=[ModelCard(id=name) for name in state.model_names])

    @app.get("/v1/sessions/{session_id}", response_model=SessionObject, responses=_ERRORS)
    async def get_session(request: Request, session_id: str):
        info = await _session_call(request, state, "info", session_id)
        if info is None:
            raise _no_session(session_id)
        return SessionObject(
            id=session_id, num_tokens=info.num_tokens, bytes=info.nbytes,
            last_used=info.last_used, in_use=info.in_use, store=state.engine.engine.sessions.kind,
        )  # fmt: skip

    @app.delete("/v1/sessions/{session_id}", response_model=SessionDeleted, responses=_ERRORS)
    async def delete_session(request: Request, session_id: str):
        if not await _session_call(request, state, "delete", session_id):
            raise _no_session(session_id)
        return SessionDeleted(id=session_id)

    @app.get("/v1/state_info", response_model=StateInfo, responses=_ERRORS)
    async def state_info(
        request: Request,
        session_id: str | None = Query(
            None, max_length=256, description="also report this saved session"
        ),
    ):
        """lln-serve extension: the state's bytes against a softmax KV cache's, the load,
        and optionally one saved session (what the playground charts)."""
        _authorize(request, state)
        if state.engine is None:
            raise APIError(503, "the engine is not ready", "service_unavailable",
                           headers={"Retry-After": "5"})  # fmt: skip
        saved = None
        if session_id is not None:  # the store's info: no lock taken; off the event loop
            saved = await _session_call(request, state, "info", session_id)
            if saved is None:
                raise APIError(
                    404, f"no saved session {session_id!r} (never saved, expired or evicted)",
                    "not_found_error", "session_id",
                )  # fmt: skip
            saved = dataclasses.replace(saved, session_id=session_id)  # not the scoped id
        return _state_info(state, saved)

    @app.post("/tokenize", **_documented(_TOKENIZE_BODY, TokenizeResponse, stream=False))
    async def tokenize_route(request: Request):
        """vLLM's extension: the ids of a prompt or of a conversation through the chat
        template; `max_model_len` bounds prompt + generation."""
        body = await _parse(request, state, tokenize_schema)
        limit = state.engine.engine.config.max_model_len
        return _input_call(lambda: tokenize(state.engine.engine.tokenizer, body, limit))

    @app.post("/detokenize", **_documented(DetokenizeRequest, DetokenizeResponse, stream=False))
    async def detokenize_route(request: Request):
        """vLLM's extension: the text of token ids."""
        body = await _parse(request, state, DetokenizeRequest)
        return _input_call(lambda: detokenize(state.engine.engine.tokenizer, body))

    @app.post("/v1/completions", **_documented(CompletionRequest, CompletionResponse))
    async def completions(request: Request):
        body = await _parse(request, state, CompletionRequest)
        return await _completions(request, state, body)

    @app.post("/v1/chat/completions", **_documented(ChatCompletionRequest, ChatCompletionResponse))
    async def chat_completions(request: Request):
        body = await _parse(request, state, ChatCompletionRequest)
        return await _chat(request, state, body)


def _input_call(call: Callable):
    try:
        return call()
    except InputError as error:
        raise APIError(400, str(error), "invalid_request_error", error.param) from None


def _add_playground(app: FastAPI) -> None:
    """`GET /` and `/static/*`: the playground, a static page that calls this server's own
    API with the key the user types (the page itself holds nothing the key protects)."""
    headers = {"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"}

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=headers)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():  # browsers ask for it whatever the page links
        return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _state_info(state: ServerState, saved: StoredSession | None) -> StateInfo:
    """saved: the store's info on the session asked about (None: none asked about)."""
    engine = state.engine.engine
    config = engine.model.config
    shape = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
    session = None
    if saved is not None:
        session = SessionInfo(
            id=saved.session_id, num_tokens=saved.num_tokens, state_bytes=saved.nbytes,
            kv_cache_equivalent_bytes=kv_cache_bytes(saved.num_tokens, *shape),
        )  # fmt: skip
    return StateInfo(
        model=state.model_names[0],
        state_bytes_per_sequence=engine.pool.bytes_per_slot,
        kv_cache_bytes_per_token=kv_cache_bytes(1, *shape),
        num_layers=shape[0], num_key_value_heads=shape[1], head_dim=shape[2],
        state_slots_allocated=engine.pool.num_slots, state_slots_used=engine.pool.num_used,
        num_requests_running=engine.num_running, num_requests_waiting=engine.num_waiting,
        session=session,
    )  # fmt: skip


# ---- request parsing ---------------------------------------------------------------------------


def _authorize(request: Request, state: ServerState) -> Tenant:
    """The caller's tenant (kept in the request's scope), or 401."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    tenant = state.tenants.authenticate(token.strip() if scheme.lower() == "bearer" else None)
    if tenant is None:
        raise APIError(401, "invalid or missing API key", "authentication_error")
    request.scope[TENANT_KEY] = tenant
    return tenant


def _rate_limited(state: ServerState, tenant: Tenant, call: Callable):
    """call() with the limiter's refusals as API errors (429, counted; 400)."""
    try:
        return call()
    except RateLimited as error:
        if state.metrics is not None:
            state.metrics.tenants.rate_limited(tenant.name, error.limit)
        raise APIError(429, str(error), error.limit, headers=error.headers) from None
    except TooLarge as error:
        raise APIError(400, str(error), "invalid_request_error") from None


def _tenant(request: Request) -> Tenant:
    tenant = scope_tenant(request.scope)
    assert tenant is not None, "_authorize first"  # a programming error, not bad input
    return tenant


def _session_key(request: Request, session_id: str | None) -> str | None:
    """The store's id of the caller's session (scoped by tenant); 400 for a bad id."""
    if session_id is None:
        return None
    if len(session_id) > 256:
        raise APIError(400, "session_id: at most 256 characters", "invalid_request_error",
                       "session_id")  # fmt: skip
    if any(ord(c) < 32 or ord(c) == 127 for c in session_id):
        raise APIError(400, "session_id: control characters are not allowed",
                       "invalid_request_error", "session_id")  # fmt: skip
    return _tenant(request).session_key(session_id)


def _unscoped(message: str, key: str, session_id: str) -> str:
    """A store message about `key` as the client knows it (its own session id)."""
    return message.replace(repr(key), repr(session_id))


def _admit(request: Request, state: ServerState, num_sequences: int, num_tokens: int) -> None:
    """Hold the tenant's rate-limit lease until the response is over; 429 or 400 if not."""
    tenant = _tenant(request)
    lease = _rate_limited(
        state, tenant, lambda: state.limiter.admit(tenant, num_sequences, num_tokens)
    )
    hold(request.scope, lease)
    if state.metrics is not None:
        state.metrics.tenants.request(tenant.name, num_tokens)


_GENERATIONS = ("/v1/completions", "/v1/chat/completions")


def _early_refusal(state: ServerState) -> Callable[[dict], Response | None]:
    """The answer to a generation request refused before routing: a missing or wrong key
    (401), or a tenant at a rate limit (429), so that a flood of refused requests costs as
    little as it can (no routing, no body read, no tokenization). None: go on."""

    def refuse(scope: dict) -> Response | None:
        if scope.get("method") != "POST" or scope.get("path") not in _GENERATIONS:
            return None
        try:
            tenant = _authorize(Request(scope), state)
            _rate_limited(state, tenant, lambda: state.limiter.check(tenant))
        except APIError as error:
            return _error_response(error)
        return None

    return refuse


async def _parse(request: Request, state: ServerState, schema: type[BaseModel] | Callable):
    """The body, authorized, bounded and validated; `schema` is a model, or a function of the
    body's JSON that picks one."""
    _authorize(request, state)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > state.max_body_bytes:
        raise _too_large(state)
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > state.max_body_bytes:
            raise _too_large(state)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise APIError(400, f"malformed JSON body: {error}", "invalid_request_error") from None
    except RecursionError:
        raise APIError(400, "the JSON body is nested too deeply", "invalid_request_error") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", "invalid_request_error")
    refused = unsupported_field(data)
    if refused is not None:
        raise APIError(400, f"{refused[0]}: {refused[1]}", "invalid_request_error", refused[0])
    if not isinstance(schema, type):
        schema = schema(data)
    try:
        body = schema.model_validate(data)
    except ValidationError as error:
        response = _invalid(error.errors())
        payload = json.loads(response.body)["error"]
        raise APIError(400, payload["message"], payload["type"], payload["param"]) from None
    _check_model(state, body.model)
    if state.engine is None or not state.engine.is_healthy:
        raise APIError(503, "the engine is not ready", "service_unavailable",
                       headers={"Retry-After": "5"})  # fmt: skip
    return body


def _check_model(state: ServerState, model: str | None) -> None:
    """404 for a model this server does not serve, naming those it does."""
    if model is not None and model not in state.model_names:
        served = ", ".join(f"`{name}`" for name in state.model_names)
        raise APIError(
            404, f"The model `{model}` does not exist; this server serves {served}.",
            "not_found_error", "model",
        )  # fmt: skip


def _store_health(store) -> dict:
    """200 either way: requests without a session are served while the store is down (a 503
    would take every replica out of its Service); the store's state is in the body."""
    if store.is_available:
        return {"status": "ok", "state_store": {"kind": store.kind, "status": "ok"}}
    error = getattr(store, "last_error", "")
    detail = {"kind": store.kind, "status": "unavailable", "error": error}
    return {"status": "degraded", "state_store": detail}


async def _session_call(request: Request, state: ServerState, action: str, session_id: str):
    """store.info / store.delete of the caller's session off the event loop, with the API's
    errors; another tenant's session is not found, as one that does not exist."""
    _authorize(request, state)
    key = _session_key(request, session_id)
    if state.engine is None or not state.engine.is_healthy:
        raise APIError(503, "the engine is not ready", "service_unavailable",
                       headers={"Retry-After": "5"})  # fmt: skip
    store = state.engine.engine.sessions
    try:
        return await asyncio.to_thread(getattr(store, action), key)
    except SessionError as error:
        message = _unscoped(str(error), key, session_id)
        raise APIError(409, message, "invalid_request_error", "session_id") from None
    except StoreUnavailableError as error:
        raise APIError(503, str(error), "service_unavailable", "session_id",
                       headers={"Retry-After": "1"}) from None  # fmt: skip


def _no_session(session_id: str) -> APIError:
    return APIError(404, f"no saved session {session_id!r}", "not_found_error", "session_id")


def _too_large(state: ServerState) -> APIError:
    return APIError(413, f"request body larger than {state.max_body_bytes} bytes",
                    "invalid_request_error")  # fmt: skip


def _guided(state: ServerState, body):
    """The request's structured output, compiled once here so that a bad schema, regex or
    grammar is a 400 before any work."""
    try:
        spec = body.guided_spec()
        if spec is not None:
            state.engine.engine.guided.compile(spec)
    except ValueError as error:
        raise APIError(400, str(error), "invalid_request_error", _guided_param(body)) from None
    return spec


def _guided_param(body) -> str:
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if getattr(body, name) is not None:
            return name
    return "response_format"


def _sampling(build) -> object:
    try:
        return build()
    except ValueError as error:
        message = str(error)
        param = message.split(" ", 1)[0]
        raise APIError(400, message, "invalid_request_error", param) from None


def _check_capacity(state: ServerState, num_prompts: int, n: int) -> None:
    """400 for work that could never be admitted; 503 + Retry-After while the queue is full."""
    engine = state.engine.engine
    try:
        engine.check_admissible(num_prompts, n)
    except ValueError as error:
        raise APIError(400, str(error), "invalid_request_error", "n") from None
    if not engine.can_accept(num_prompts * n):
        raise APIError(503, "the server is overloaded; retry later", "service_unavailable",
                       headers={"Retry-After": "1"})  # fmt: skip


# ---- engine calls ------------------------------------------------------------------------------


@dataclass
class _Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_logprobs: list | None = None
    held_logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens not yet sent


def _held_back(choice: _Choice, out: RequestOutput, text: str, first: bool) -> bool:
    """True for a streamed output with no text to send (the detokenizer holds back part of a
    character): no chunk goes out; its logprobs wait for the next one."""
    if text or out.finished or first:
        return False
    choice.held_logprobs += out.logprobs or []
    return True


def _with_held(choice: _Choice, out: RequestOutput) -> list[TokenLogprob]:
    """The output's logprobs after those of the tokens held back before it."""
    entries, choice.held_logprobs = [*choice.held_logprobs, *(out.logprobs or [])], []
    return entries


@dataclass(frozen=True)
class _Caller:
    """Whose request it is: the tenant, its session (as named by the client, and as the
    store knows it) and the prefix cache's scope."""

    tenant: Tenant
    session_id: str | None
    session_key: str | None
    prefix_salt: bytes


def _caller(request: Request, body) -> _Caller:
    tenant = _tenant(request)
    key = _session_key(request, body.session_id)
    return _Caller(tenant, body.session_id, key, tenant.prefix_salt(body.cache_salt))


async def _outputs(
    state: ServerState, request_id: str, prompt_ids: list[int], params, caller: _Caller,
    return_progress: bool = False,
) -> AsyncIterator[RequestOutput]:  # fmt: skip
    """The engine's stream for one prompt, with metrics, the tenant's generated tokens, and
    errors mapped to API errors."""
    engine = state.engine
    try:
        async for out in engine.generate(
            request_id, prompt_ids, params, caller.session_key, return_progress=return_progress,
            prefix_salt=caller.prefix_salt, tenant=caller.tenant.name,
        ):  # fmt: skip
            if out.progress is None:
                _account(state, caller.tenant, out)
            yield out
    except QueueFullError as error:
        raise APIError(
            503, str(error), "service_unavailable", headers={"Retry-After": "1"}
        ) from None
    except SessionError as error:
        message = _unscoped(str(error), caller.session_key, caller.session_id)
        raise APIError(409, message, "invalid_request_error", "session_id") from None
    except StoreUnavailableError as error:
        raise APIError(503, str(error), "service_unavailable", "session_id",
                       headers={"Retry-After": "1"}) from None  # fmt: skip
    except ValueError as error:
        raise APIError(400, str(error), "invalid_request_error") from None
    except (EngineDeadError, ShuttingDownError) as error:
        raise APIError(503, str(error), "service_unavailable") from None


def _account(state: ServerState, tenant: Tenant, out: RequestOutput) -> None:
    if out.token_ids:
        state.limiter.charge(tenant, len(out.token_ids))
    if state.metrics is not None:
        state.metrics.observe(out)
        state.metrics.tenants.generated(tenant.name, len(out.token_ids))


async def _merged(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several prompts as they come: (prompt number, output)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(number: int, stream):
        try:
            async for out in stream:
                await queue.put((number, out))
        except BaseException as error:
            await queue.put((number, error))
        finally:
            await queue.put((number, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            number, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield number, item
    finally:
        for task in tasks:
            task.cancel()


def _usage(choices: list[_Choice], prompts: list[_Choice]) -> Usage:
    prompt_tokens = sum(c.num_prompt_tokens for c in prompts)
    completion = sum(len(c.token_ids) for c in choices)
    cached = sum(c.num_cached_tokens for c in prompts)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


async def _until_disconnect(request: Request, work):
    """Run `work`; if the client goes away first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)
    while not task.done():
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if not done and await request.is_disconnected():
            task.cancel()
            raise APIError(499, "client disconnected", "client_closed_request")
    return task.result()


# ---- /v1/completions -----------------------------------------------------------------------------


async def _completions(request: Request, state: ServerState, body: CompletionRequest):
    tokenizer = state.engine.engine.tokenizer
    prompts = [
        tokenizer(p, add_special_tokens=False).input_ids if isinstance(p, str) else p
        for p in body.prompts()
    ]
    if body.session_id is not None and len(prompts) > 1:
        raise APIError(400, "a request with a session_id takes one prompt", "invalid_request_error",
                       "session_id")  # fmt: skip
    if any(not p for p in prompts):
        raise APIError(
            400, "prompt must contain at least one token", "invalid_request_error", "prompt"
        )
    if body.logprobs is not None and not 0 <= body.logprobs <= 20:
        raise APIError(
            400, "logprobs must be between 0 and 20", "invalid_request_error", "logprobs"
        )
    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    params = _sampling(lambda: body.sampling_params(
        body.max_tokens, logprobs=body.logprobs, prompt_logprobs=prompt_logprobs,
        guided=_guided(state, body),
    ))  # fmt: skip
    _check_capacity(state, len(prompts), body.n)
    caller = _caller(request, body)
    _admit(request, state, len(prompts) * body.n, sum(map(len, prompts)))
    request_id = new_id("cmpl")
    progress = body.stream and body.return_progress
    streams = [
        _outputs(state, f"{request_id}-{i}", ids, params, caller, progress)
        for i, ids in enumerate(prompts)
    ]
    n = body.n
    choices = [_Choice(i * n + j) for i in range(len(prompts)) for j in range(n)]
    echo_texts = [tokenizer.decode(ids) if body.echo else "" for ids in prompts]
    if body.stream:
        first = await _first_or_error(_merged(streams))
        return _sse(_completion_events(body, request_id, first, choices, prompts,
                                       echo_texts, tokenizer))  # fmt: skip
    return await _until_disconnect(request, _completion_full(
        body, request_id, _merged(streams), choices, prompts, echo_texts, tokenizer
    ))  # fmt: skip


async def _completion_full(body, request_id, merged, choices, prompts, echo, tokenizer):
    async for number, out in merged:
        _accumulate(choices[number * body.n + out.index], out)
    result = []
    for choice in choices:
        number = choice.index // body.n
        text = echo[number] + choice.text
        result.append(CompletionChoice(
            index=choice.index, text=text, finish_reason=choice.finish_reason,
            logprobs=None if body.logprobs is None else _completion_logprobs(
                choice, tokenizer, prompts[number], body.echo
            ),
        ))  # fmt: skip
    firsts = [choices[i * body.n] for i in range(len(prompts))]
    return CompletionResponse(
        id=request_id, model=body.model, choices=result, usage=_usage(choices, firsts)
    )


def _accumulate(choice: _Choice, out: RequestOutput) -> None:
    choice.text += out.text
    choice.token_ids += out.token_ids
    choice.logprobs += out.logprobs or []
    choice.num_prompt_tokens = out.num_prompt_tokens
    choice.num_cached_tokens = out.num_cached_tokens
    if out.prompt_logprobs is not None:
        choice.prompt_logprobs = out.prompt_logprobs
    if out.finished:
        choice.finish_reason = out.finish_reason
    if out.error is not None:
        raise APIError(500, f"generation failed: {out.error}", "internal_error")
    if out.store_error is not None:  # the session stays at its previous turn: retry it
        raise APIError(503, out.store_error, "service_unavailable", "session_id",
                       headers={"Retry-After": "1"})  # fmt: skip


def _completion_logprobs(choice: _Choice, tokenizer, prompt_ids: list[int], echo: bool):
    """OpenAI's completion logprobs of the choice's tokens, after the prompt's when echoed."""
    entries: list[TokenLogprob | None] = []
    if echo:
        entries += choice.prompt_logprobs or [None] * len(prompt_ids)
    entries += choice.logprobs
    tokens = [tokenizer.decode([t]) for t in (prompt_ids if echo else [])]
    tokens += [tokenizer.decode([e.token_id]) for e in choice.logprobs]
    result = CompletionLogprobs()
    offset = 0
    for token, entry in zip(tokens, entries, strict=True):
        result.tokens.append(token)
        result.text_offset.append(offset)
        offset += len(token)
        if entry is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
        else:
            result.token_logprobs.append(entry.logprob)
            result.top_logprobs.append({tokenizer.decode([t]): lp for t, lp in entry.top})
    return result


async def _completion_events(body, request_id, first, choices, prompts, echo, tokenizer):
    n = body.n
    merged, pending = first
    sent_echo = set()
    try:
        async for number, out in _chain(pending, merged):
            if out.progress is not None:
                chunk = CompletionResponse(id=request_id, model=body.model, choices=[])
                yield _progress_event(chunk, out, number if len(prompts) > 1 else None)
                continue
            choice = choices[number * n + out.index]
            _accumulate(choice, out)
            text = out.text
            if body.echo and choice.index not in sent_echo:
                sent_echo.add(choice.index)
                text = echo[number] + text
            if _held_back(choice, out, text, first=False):
                continue
            logprobs, entries = None, _with_held(choice, out)
            if body.logprobs is not None and entries:
                step = _Choice(choice.index, logprobs=entries)
                logprobs = _completion_logprobs(step, tokenizer, [], echo=False)
            chunk = CompletionResponse(id=request_id, model=body.model, choices=[CompletionChoice(
                index=choice.index, text=text, logprobs=logprobs,
                finish_reason=out.finish_reason if out.finished else None,
            )])  # fmt: skip
            yield _event(chunk.model_dump(exclude_none=False))
        if body.stream_options and body.stream_options.include_usage:
            firsts = [choices[i * n] for i in range(len(prompts))]
            usage = CompletionResponse(id=request_id, model=body.model, choices=[],
                                       usage=_usage(choices, firsts))  # fmt: skip
            yield _event(usage.model_dump())
    except APIError as error:
        yield _error_event(error)
    yield "data: [DONE]\n\n"


# ---- /v1/chat/completions ------------------------------------------------------------------------


async def _chat(request: Request, state: ServerState, body: ChatCompletionRequest):
    tokenizer = state.engine.engine.tokenizer
    plan = _tool_call(lambda: plan_chat(body, tokenizer))
    ids = None
    caller = _caller(request, body)
    if caller.session_key is not None:  # a continued session: only its new turns
        saved = await _stored_session(state, caller.session_key)
        if saved is not None and saved.pending is not None:
            ids = _continuation_ids(tokenizer, plan.history, list(saved.pending))
    ids = ids or _chat_ids(tokenizer, plan.messages, plan.tools)
    top = body.top_logprobs
    if top is not None and not 0 <= top <= 20:
        raise APIError(400, "top_logprobs must be between 0 and 20", "invalid_request_error",
                       "top_logprobs")  # fmt: skip
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    logprobs = (top or 0) if body.logprobs else None
    guided = _guided(state, body) if plan.format is None else _tool_grammar(state, plan)
    params = _sampling(lambda: body.sampling_params(max_tokens, logprobs=logprobs, guided=guided))
    _check_capacity(state, 1, body.n)
    _admit(request, state, body.n, len(ids))
    request_id = new_id("chatcmpl")
    progress = body.stream and body.return_progress
    stream = _outputs(state, request_id, list(ids), params, caller, progress)
    choices = [_Choice(i) for i in range(body.n)]
    if body.stream:
        first = await _first_or_error(_merged([stream]))
        return _sse(_chat_events(body, request_id, first, choices, tokenizer, plan))
    return await _until_disconnect(
        request, _chat_full(body, request_id, stream, choices, tokenizer, plan)
    )


def _tool_call(build: Callable[[], ChatPlan]) -> ChatPlan:
    try:
        return build()
    except ToolError as error:
        raise APIError(400, str(error), "invalid_request_error", error.param) from None


def _tool_grammar(state: ServerState, plan: ChatPlan):
    """The grammar of the tools' calls, compiled here so that a bad schema is a 400."""
    if plan.guided is None:
        return None
    try:
        state.engine.engine.guided.compile(plan.guided)
    except ValueError as error:
        message = f"the tools' schemas cannot be used: {error}"
        raise APIError(400, message, "invalid_request_error", "tools") from None
    return plan.guided


async def _stored_session(state: ServerState, session_id: str) -> StoredSession | None:
    """The store's info on a session (no lock; off the event loop, as Redis is a network call).
    None where there is none or the store cannot say (unreachable): the chat is then rendered
    whole, and the engine answers for the session itself."""
    try:
        return await asyncio.to_thread(state.engine.engine.sessions.info, session_id)
    except (SessionError, StoreUnavailableError):
        return None


def _chat_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, tools=tools
        )
    except Exception as error:  # the template refuses some conversations (e.g. role order)
        raise APIError(
            400, f"chat template: {error}", "invalid_request_error", "messages"
        ) from None
    return list(ids["input_ids"] if hasattr(ids, "input_ids") else ids)


# a finished exchange that a continued session's new messages are rendered after
_ANSWER = "lln-serve-earlier-answer"
_EARLIER = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _ANSWER}]


def _continuation_ids(tokenizer, messages: list[dict], pending: list[int]) -> list[int] | None:
    """The new messages of a continued chat session as the template renders them after an
    earlier answer: the rest of that answer's closing (what follows its last token, often
    end-of-turn), then the new turns, without the template's opening (such as a default system
    prompt) again. None where the template does not render that way: then plainly."""
    try:
        before = tokenizer.apply_chat_template(_EARLIER, tokenize=False)
        after = tokenizer.apply_chat_template(
            [*_EARLIER, *messages], add_generation_prompt=True, tokenize=False
        )
    except Exception:  # e.g. a template that refuses a system message here
        return None
    if not isinstance(before, str) or not isinstance(after, str) or not after.startswith(before):
        return None
    closing = before[before.rindex(_ANSWER) + len(_ANSWER) :]
    last = tokenizer.decode(pending)  # the state's last token, usually the end of the turn
    if last and closing.startswith(last):
        closing = closing[len(last) :]
    text = closing + after[len(before) :]
    return tokenizer(text, add_special_tokens=False).input_ids or None


async def _chat_full(body, request_id, stream, choices, tokenizer, plan: ChatPlan):
    async for out in stream:
        _accumulate(choices[out.index], out)
    result = []
    for c in choices:
        reply = plan.parse(c.text) if plan.format else Reply(c.text)
        result.append(ChatChoice(
            index=c.index,
            message=_assistant_message(reply),
            logprobs=_chat_logprobs(c.logprobs, tokenizer) if body.logprobs else None,
            finish_reason=_finish_reason(c.finish_reason, bool(reply.calls)),
        ))  # fmt: skip
    return ChatCompletionResponse(
        id=request_id, model=body.model, choices=result, usage=_usage(choices, choices[:1])
    )


def _assistant_message(reply: Reply) -> AssistantMessage:
    if not reply.calls:
        return AssistantMessage(content=reply.content or "")
    calls = [
        ResponseToolCall(id=c.id, function=ResponseFunctionCall(name=c.name, arguments=c.arguments))
        for c in reply.calls
    ]
    return AssistantMessage(content=reply.content, tool_calls=calls)


def _finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's `tool_calls` for a reply that ended with its calls (not for one cut short)."""
    return "tool_calls" if called and reason == "stop" else reason


def _chat_logprobs(entries: list[TokenLogprob], tokenizer) -> ChatLogprobs:
    def top_entry(token_id: int, logprob: float) -> TopLogprob:
        text = tokenizer.decode([token_id])
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = []
    for e in entries:
        head = top_entry(e.token_id, e.logprob)
        content.append(ChatTokenLogprob(
            **head.model_dump(), top_logprobs=[top_entry(t, lp) for t, lp in e.top]
        ))  # fmt: skip
    return ChatLogprobs(content=content)


async def _chat_events(body, request_id, first, choices, tokenizer, plan: ChatPlan):
    merged, pending = first
    started = set()
    splitters = [plan.splitter() for _ in choices] if plan.format else None
    called = set()
    try:
        async for _, out in _chain(pending, merged):
            if out.progress is not None:
                chunk = ChatCompletionChunk(id=request_id, model=body.model, choices=[])
                yield _progress_event(chunk, out, None)
                continue
            choice = choices[out.index]
            _accumulate(choice, out)
            if splitters is None:
                delta = DeltaMessage(content=out.text)
            else:
                delta = _tool_delta(splitters[out.index], out)
                called.update([out.index] if delta.tool_calls else [])
            if _held_back(choice, out, _sent(delta), first=out.index not in started):
                continue
            if out.index not in started:
                started.add(out.index)
                delta.role = "assistant"
            entries = _with_held(choice, out)
            logprobs = _chat_logprobs(entries, tokenizer) if body.logprobs else None
            reason = _finish_reason(out.finish_reason, out.index in called)
            chunk = ChatCompletionChunk(id=request_id, model=body.model, choices=[ChatChunkChoice(
                index=out.index, delta=delta, logprobs=logprobs,
                finish_reason=reason if out.finished else None,
            )])  # fmt: skip
            yield _event(chunk.model_dump(exclude_none=True))
        if body.stream_options and body.stream_options.include_usage:
            usage = ChatCompletionChunk(id=request_id, model=body.model, choices=[],
                                        usage=_usage(choices, choices[:1]))  # fmt: skip
            yield _event(usage.model_dump(exclude_none=True))
    except APIError as error:
        yield _error_event(error)
    yield "data: [DONE]\n\n"


def _sent(delta: DeltaMessage) -> str:
    """What a delta sends ("" for none: the chunk is held back)."""
    return (delta.content or "") + ("call" if delta.tool_calls else "")


def _tool_delta(splitter, out: RequestOutput) -> DeltaMessage:
    """The content and call pieces of one output (all that is left, if it is the last)."""
    pieces = splitter.feed(out.text)
    if out.finished:
        pieces += splitter.finish()
    content, calls = merge(pieces)
    return DeltaMessage(content=content, tool_calls=[_delta_call(c) for c in calls] or None)


def _delta_call(piece: CallDelta) -> DeltaToolCall:
    first = piece.id is not None
    return DeltaToolCall(
        index=piece.index, id=piece.id, type="function" if first else None,
        function=DeltaFunctionCall(name=piece.name, arguments=piece.arguments),
    )  # fmt: skip


# ---- SSE helpers ---------------------------------------------------------------------------------


async def _first_or_error(merged):
    """Wait for the first output before answering, so that errors that come before any
    output (queue full, bad session, bad input) get their HTTP status, not a stream."""
    try:
        first = await merged.__anext__()
    except StopAsyncIteration:
        return merged, []
    return merged, [first]


async def _chain(pending: list, merged):
    for item in pending:
        yield item
    async for item in merged:
        yield item


def _progress_event(chunk, out: RequestOutput, prompt_index: int | None) -> str:
    """llama.cpp's progress chunk: no choices, `prompt_progress` at the top; prompt_index
    tells apart the prompts of a completion request that has several."""
    progress = dataclasses.asdict(out.progress)
    if prompt_index is not None:
        progress["prompt_index"] = prompt_index
    return _event({**chunk.model_dump(exclude_none=True), "prompt_progress": progress})


def _error_event(error: APIError) -> str:
    return _event(_error_body(error.status, error.message, error.type, error.param))


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _sse(events) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )
