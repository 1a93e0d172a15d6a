"""`/tokenize` and `/detokenize` (vLLM's extension routes): a prompt or a conversation to the
ids the engine would be given, and ids back to text. Bad input is an InputError that names the
field; the API answers it with a 400."""

from __future__ import annotations

from server.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)
from server.tools import ChatPlan, ToolError, plan_chat


class InputError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def tokenize_schema(data: dict) -> type[TokenizeChatRequest] | type[TokenizeCompletionRequest]:
    """The request shape a body asks for: a conversation if it has `messages`."""
    return TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest


def tokenize(
    tokenizer, body: TokenizeCompletionRequest | TokenizeChatRequest, max_model_len: int
) -> TokenizeResponse:
    if isinstance(body, TokenizeChatRequest):
        text = _render_chat(tokenizer, body)
    elif body.prompt:
        text = body.prompt
    else:
        raise InputError("prompt", "must not be empty")
    ids = list(tokenizer(text, add_special_tokens=body.add_special_tokens).input_ids)
    strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids,
                            token_strs=strs)  # fmt: skip


def detokenize(tokenizer, body: DetokenizeRequest) -> DetokenizeResponse:
    if not body.tokens:
        raise InputError("tokens", "must contain at least one token id")
    size = len(tokenizer)
    bad = next((t for t in body.tokens if not 0 <= t < size), None)
    if bad is not None:
        raise InputError("tokens", f"token id {bad} is outside the vocabulary (0..{size - 1})")
    return DetokenizeResponse(prompt=tokenizer.decode(body.tokens))


def _render_chat(tokenizer, body: TokenizeChatRequest) -> str:
    """The conversation as /v1/chat/completions feeds it: its tools and tool history through
    the same plan (the tool prompt, or the template's own tools), then the chat template."""
    if not body.messages:
        raise InputError("messages", "must contain at least one message")
    plan = _chat_plan(tokenizer, body)
    try:
        text = tokenizer.apply_chat_template(
            plan.messages,
            add_generation_prompt=body.add_generation_prompt,
            tokenize=False,
            tools=plan.tools,
        )
    except Exception as error:  # the template refuses some conversations (e.g. role order)
        raise InputError("messages", f"chat template: {error}") from None
    if not isinstance(text, str) or not text:
        raise InputError("messages", "the chat template rendered nothing")
    return text


def _chat_plan(tokenizer, body: TokenizeChatRequest) -> ChatPlan:
    fields = {"messages", "tools", "tool_choice", "parallel_tool_calls"}
    chat = ChatCompletionRequest.model_validate({"model": "", **body.model_dump(include=fields)})
    try:
        return plan_chat(chat, tokenizer)
    except ToolError as error:
        raise InputError(error.param, str(error).removeprefix(f"{error.param}: ")) from None
