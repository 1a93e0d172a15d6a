"""OpenAI wire format (vLLM's flavour): request, response and chunk schemas, and the mapping
from a request to SamplingParams. Value checks live in SamplingParams (one place), so that
the API and the offline engine refuse the same things with the same messages."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.request import GuidedSpec, SamplingParams

# Fields of OpenAI's API this server does not honour: a request that sets one gets a 400 that
# says so (with a value that asks for nothing, e.g. `functions: []`, it passes).
UNSUPPORTED = {
    "functions": "the legacy `functions` field is not supported: use `tools`",
    "function_call": "the legacy `function_call` field is not supported: use `tool_choice`",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "suffix": "suffix (insertion) is not supported",
    "best_of": "best_of is not supported (use n)",
}
ASKS_NOTHING = (None, [], "none", False, ["text"])
MAX_STOP = 64  # stop strings (and stop token ids) per request; each is checked on every token


def unsupported_field(data: dict) -> tuple[str, str] | None:
    """(field, why) for the first field in a request body that this server cannot honour."""
    for name, why in UNSUPPORTED.items():
        if name in data and data[name] not in ASKS_NOTHING:
            if name == "best_of" and data[name] == data.get("n", 1):
                continue
            return name, why
    return None


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Request(BaseModel):
    """Request bodies refuse fields they do not know: nothing a client asks for is silently
    ignored (the fields in UNSUPPORTED get a message of their own first). Types are JSON's,
    strictly: "yes" is not a boolean nor "5" a number (integers are accepted as numbers)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class JSONSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions (OpenAI's and vLLM's extensions)."""

    model: str
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP)] | None = None
    stop_token_ids: Annotated[list[int], Field(max_length=MAX_STOP)] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the client's records: no effect on output
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    session_id: str | None = Field(
        max_length=256,
        default=None,
        description="lln-serve extension: continue the saved state of this session "
        "(send only the new text), and save the state after this request under it.",
    )
    cache_salt: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="vLLM's field: prompts share prefix-cache states only with prompts of the "
        "same cache_salt (and of the same tenant, always), so that the time to first token "
        "tells nothing of other clients' prompts.",
    )
    return_progress: bool = Field(
        default=False,
        description="llama.cpp's extension: with stream, chunks with `choices: []` and "
        "`prompt_progress` {total, cache, processed, time_ms} while the prompt prefills (one per "
        "engine step, the last at processed == total), before the first token. Without stream "
        "it asks for nothing (as in llama.cpp).",
    )

    def guided_spec(self) -> GuidedSpec | None:
        """The structured output asked for (at most one way), or None. Raises ValueError."""
        fmt = self.response_format
        asked = {
            "response_format": fmt is not None and fmt.type != "text",
            "guided_json": self.guided_json is not None,
            "guided_regex": self.guided_regex is not None,
            "guided_choice": self.guided_choice is not None,
            "guided_grammar": self.guided_grammar is not None,
        }
        names = [name for name, on in asked.items() if on]
        if len(names) > 1:
            raise ValueError(f"{names[0]} and {names[1]} both constrain the output: use one")
        if not names:
            return None
        if names[0] == "response_format":
            if fmt.type == "json_object":
                return GuidedSpec.json_schema(None)
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise ValueError("response_format json_schema needs json_schema.schema")
            return GuidedSpec.json_schema(fmt.json_schema.schema_)
        if names[0] == "guided_json":
            return GuidedSpec.json_schema(self.guided_json)
        if names[0] == "guided_choice":
            return GuidedSpec.choice(self.guided_choice)
        if names[0] == "guided_regex":
            return GuidedSpec("regex", self.guided_regex)
        return GuidedSpec("grammar", self.guided_grammar)

    def sampling_params(self, max_tokens: int | None, **extra: Any) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=self.stop or (),
            stop_token_ids=self.stop_token_ids or (),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=self.logit_bias or (),
            **extra,
        )


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be empty")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list of strings or token id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str
    arguments: str = Field(description="the arguments as JSON text (a string, as OpenAI's)")

    @field_validator("arguments", mode="before")
    @classmethod
    def _json_text(cls, arguments):
        if not isinstance(arguments, str):
            raise ValueError(
                f"must be a string of JSON (as OpenAI returns it), not {type(arguments).__name__}"
            )
        return arguments


class ToolCall(_Request):
    """A call an assistant message made (the history of a conversation with tools)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(
        default=None, description="assistant messages: the calls it made (content may be null)"
    )
    tool_call_id: str | None = Field(
        default=None, description="tool messages: the id of the call this is the result of"
    )

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict:
        """The message as a chat template takes it (a participant's name too: it may use it)."""
        return {
            "role": self.role,
            "content": self.text(),
            **({"name": self.name} if self.name else {}),
        }


class FunctionDefinition(_Request):
    name: str = Field(description="letters, digits, `_`, `-` and `.`, at most 64")
    description: str | None = None
    parameters: dict | None = Field(
        default=None, description="a JSON schema of type object (the arguments)"
    )
    strict: bool | None = None  # the arguments always follow the schema here


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        default=None,
        description="auto (the default with tools): a call or an answer; required: a call; "
        "none: an answer; a named function: a call of that one",
    )
    parallel_tool_calls: bool | None = Field(
        default=None,
        description="let one reply make several calls (default false, as llama.cpp's)",
    )
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    @field_validator("messages")
    @classmethod
    def _non_empty(cls, messages):
        if not messages:
            raise ValueError("messages must contain at least one message")
        return messages


class TokenizeCompletionRequest(_Request):
    """`POST /tokenize` of a prompt (vLLM's shape)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Request):
    """`POST /tokenize` of a conversation through the chat template (vLLM's shape), with its
    tools rendered as /v1/chat/completions renders them."""

    model: str | None = None
    messages: list[ChatMessage]
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = False
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses -------------------------------------------------------------------------------


class TokenizeResponse(_Model):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Model):
    prompt: str


class PromptTokensDetails(_Model):
    cached_tokens: int = 0


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(_Model):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(_Model):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(_Model):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(_Model):
    content: list[ChatTokenLogprob] | None = None


class ResponseFunctionCall(_Model):
    name: str
    arguments: str


class ResponseToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(_Model):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunctionCall(_Model):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Model):
    """A piece of a streamed call: `id`, `type` and `function.name` in its first delta only,
    `function.arguments` in pieces (concatenated by the client, as the OpenAI SDK does)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


class DeltaMessage(_Model):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(_Model):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Model):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(_Model):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "lln-serve"


class ModelList(_Model):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SessionInfo(_Model):
    """One saved conversation: what its state holds and what it costs."""

    id: str
    num_tokens: int = Field(description="tokens the saved state has seen (the context)")
    state_bytes: int = Field(description="bytes of the saved state, at any context length")
    kv_cache_equivalent_bytes: int = Field(
        description="the KV cache a softmax model of the same shape would hold (bf16)"
    )


class StateInfo(_Model):
    """lln-serve extension (`GET /v1/state_info`): the constant state against the KV cache a
    softmax model of the same shape would need, and the live load."""

    object: Literal["state_info"] = "state_info"
    model: str
    state_bytes_per_sequence: int
    kv_cache_bytes_per_token: int = Field(description="softmax KV cache per token, bf16")
    num_layers: int
    num_key_value_heads: int
    head_dim: int
    state_slots_allocated: int
    state_slots_used: int
    num_requests_running: int
    num_requests_waiting: int
    session: SessionInfo | None = None


class ErrorInfo(_Model):
    message: str
    type: str
    param: str | None = None
    code: int  # the HTTP status


class ErrorResponse(_Model):
    error: ErrorInfo


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class SessionObject(BaseModel):
    """`GET /v1/sessions/{id}` (lln-serve extension): a saved conversation state."""

    id: str
    object: Literal["session"] = "session"
    num_tokens: int = Field(description="tokens the state has seen (the whole conversation)")
    bytes: int = Field(description="bytes of the saved state, the same at any length")
    last_used: float = Field(description="Unix time of the last save")
    in_use: bool = Field(description="a request is continuing it now")
    store: str = Field(description="memory (this process) or redis")


class SessionDeleted(BaseModel):
    """`DELETE /v1/sessions/{id}`."""

    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True
