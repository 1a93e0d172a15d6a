"""Tool calling for any chat template: a request's tools, tool_choice and history turned into
what the template renders, the grammar that constrains the reply, and the format its reply is
parsed in (`server/tool_stream.py`).

A template that renders `tools` and the calls in its history in a format this server parses
(Hermes / Qwen2.5 `<tool_call>`, Llama 3.1 JSON) is given them as they are (`native`). Any other
template (the default model's) gets the tools and an answer format in its system prompt, or its
first user turn where it has no system role, and the reply is constrained to one JSON object
(`generic`, llama.cpp's generic format): `{"tool_call": {"name", "arguments"}}`,
`{"tool_calls": [...]}` with parallel_tool_calls, or `{"response": ...}` when an answer is
allowed (following response_format, if any)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from server.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice, Tool
from server.request import GuidedSpec
from server.tool_stream import Reply, make_splitter, parse_reply

MAX_TOOLS = 128  # as OpenAI's API
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
COMPACT = {"whitespace_flexible": False}  # as server/guided.py: no free whitespace
_GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


class ToolError(ValueError):
    """Bad tools, tool_choice or tool history: the API answers 400 naming `param`."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class TemplateSupport:
    """What a chat template renders (found by rendering probes)."""

    native: str | None  # "hermes" or "llama3_json": renders tools and calls in that format
    system: bool  # renders a system message
    tool_role: bool  # renders a message of role "tool"


@dataclass
class ChatPlan:
    """A chat request ready for the template: `messages` (tool prompt included), `tools` for
    the template (native), the grammar (None: the request's own, if any) and the reply format
    (None: no calls possible)."""

    messages: list[dict]
    history: list[dict]  # the messages without the tool prompt (a continued session's)
    tools: list[dict] | None = None
    guided: GuidedSpec | None = None
    format: str | None = None
    choice: str = "none"
    names: list[str] = field(default_factory=list)

    def parse(self, text: str) -> Reply:
        return parse_reply(self.format, text)

    def splitter(self):
        return make_splitter(self.format)


def plan_chat(body: ChatCompletionRequest, tokenizer) -> ChatPlan:
    """Raises ToolError for tools, choices or history the server cannot honour."""
    tools = checked_tools(body.tools)
    choice = checked_choice(body.tool_choice, tools)
    has_history = any(m.tool_calls or m.role == "tool" for m in body.messages)
    if choice == "none" and not has_history:
        messages = [m.for_template() for m in body.messages]
        return ChatPlan(messages, messages)
    support = template_support(tokenizer)
    history = history_messages(body.messages, support, body.session_id is not None)
    if choice == "none":
        return ChatPlan(history, history)
    _refuse_other_constraints(body)
    parallel = bool(body.parallel_tool_calls)
    response = _response_schema(body) if choice == "auto" else None
    plan = ChatPlan(history, history, choice=choice, names=[t["name"] for t in tools])
    if support.native is not None:
        plan.tools = [{"type": "function", "function": t} for t in tools]
        plan.format = support.native
        plan.guided = native_grammar(support.native, tools, choice, parallel, response)
        return plan
    prompt = tool_prompt(tools, choice, parallel, response)
    plan.messages = with_tool_prompt(history, prompt, support.system)
    plan.format = "generic"
    plan.guided = GuidedSpec.json_schema(generic_schema(tools, choice, parallel, response))
    return plan


# ---- the request's tools and choice ------------------------------------------------------------


def checked_tools(tools: list[Tool] | None) -> list[dict]:
    """The tools as {name, description, parameters} (an object schema; none: no arguments)."""
    if not tools:
        return []
    if len(tools) > MAX_TOOLS:
        raise ToolError("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    result, seen = [], set()
    for i, tool in enumerate(tools):
        fn = tool.function
        if not NAME.fullmatch(fn.name):
            raise ToolError(
                f"tools.{i}.function.name",
                f"{fn.name[:80]!r} is not a tool name: 1 to 64 letters, digits, `_`, `-`, `.`",
            )
        if fn.name in seen:
            raise ToolError(f"tools.{i}.function.name", f"two tools are named {fn.name!r}")
        seen.add(fn.name)
        result.append({"name": fn.name, "description": fn.description or "",
                       "parameters": _object_schema(fn.parameters, i)})  # fmt: skip
    return result


def _object_schema(parameters: dict | None, i: int) -> dict:
    if not parameters:
        return {"type": "object", "properties": {}}
    if parameters.get("type") != "object":
        raise ToolError(
            f"tools.{i}.function.parameters",
            'must be a JSON schema of "type": "object" (the arguments are a JSON object), '
            f"got type {json.dumps(parameters.get('type'))}",
        )
    return parameters


def checked_choice(choice: str | NamedToolChoice | None, tools: list[dict]) -> str:
    """ "none", "auto", "required", or the name of the one tool to call."""
    if not tools:
        if choice not in (None, "none"):
            raise ToolError("tool_choice", "needs tools: the request has none")
        return "none"
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        return choice
    name = choice.function.name
    if name not in {t["name"] for t in tools}:
        raise ToolError("tool_choice", f"names the function {name[:80]!r}, which is not a tool")
    return name


def _refuse_other_constraints(body: ChatCompletionRequest) -> None:
    for name in _GUIDED_FIELDS:
        if getattr(body, name) is not None:
            raise ToolError(name, "cannot be used with tools (the reply follows the tools' "
                            "schemas; use response_format for the answer)")  # fmt: skip


def _response_schema(body: ChatCompletionRequest) -> dict | None:
    """The schema an answer follows (response_format), or None for free text."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ToolError("response_format", "json_schema needs json_schema.schema")
    return fmt.json_schema.schema_


# ---- what the template can render ----------------------------------------------------------------

_PROBE_TOOL = {"type": "function", "function": {
    "name": "lln_probe_tool", "description": "probe",
    "parameters": {"type": "object", "properties": {"lln_probe_arg": {"type": "string"}}},
}}  # fmt: skip
_PROBE_CALL = {
    "id": "call_probe",
    "type": "function",
    "function": {"name": "lln_probe_call", "arguments": {"lln_probe_arg": "v"}},
}


def template_support(tokenizer) -> TemplateSupport:
    user = {"role": "user", "content": "x"}
    tools = _renders(tokenizer, [user], "lln_probe_tool", tools=[_PROBE_TOOL])
    called = {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}
    calls = _renders(tokenizer, [user, called], "lln_probe_call", tools=[_PROBE_TOOL])
    source = str(tokenizer.chat_template or "")
    native = None
    if tools and calls:
        if "<tool_call>" in source:
            native = "hermes"
        elif "<|python_tag|>" in source:
            native = "llama3_json"
    system = _renders(tokenizer, [{"role": "system", "content": "lln_probe_sys"}, user],
                      "lln_probe_sys")  # fmt: skip
    result = {"role": "tool", "content": "lln_probe_res", "tool_call_id": "call_probe"}
    tool_role = _renders(tokenizer, [user, called, result], "lln_probe_res")
    return TemplateSupport(native, system, tool_role)


def _renders(tokenizer, messages: list[dict], needle: str, **extra) -> bool:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **extra)
    except Exception:  # a template may refuse any of these: then it does not render them
        return False
    return isinstance(text, str) and needle in text


# ---- history: earlier calls and their results --------------------------------------------------


def history_messages(
    messages: list[ChatMessage], support: TemplateSupport, continued: bool = False
) -> list[dict]:
    """The conversation for the template: calls and results in the template's own format
    (native), or as the generic format's JSON. Raises ToolError for a result of no call
    (unless `continued`: a session's new turns answer calls its saved state holds)."""
    names: dict[str, str] = {}
    result = []
    for i, message in enumerate(messages):
        if message.role == "tool":
            result.append(_tool_result(i, message, names, support, continued))
        elif message.role == "assistant" and message.tool_calls:
            calls = [(c.id, c.function.name, _arguments(c.function.arguments))
                     for c in message.tool_calls]  # fmt: skip
            names.update((call_id, name) for call_id, name, _ in calls)
            result.append(_assistant_calls(message, calls, support))
        else:
            result.append(message.for_template())
    return result


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:  # a model's malformed call, sent back as it was
        return text


def _assistant_calls(message: ChatMessage, calls: list[tuple], support: TemplateSupport):
    if support.native is not None:
        return {"role": "assistant", "content": message.text(), "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            for call_id, name, args in calls
        ]}  # fmt: skip
    objects = [{"name": name, "arguments": args} for _, name, args in calls]
    wrapped = {"tool_call": objects[0]} if len(objects) == 1 else {"tool_calls": objects}
    text = json.dumps(wrapped, ensure_ascii=False)
    if message.text():
        text = f"{message.text()}\n{text}"
    return {"role": "assistant", "content": text}


def _tool_result(
    i: int, message: ChatMessage, names: dict, support: TemplateSupport, continued: bool
) -> dict:
    call_id = message.tool_call_id
    if call_id is None:
        raise ToolError(f"messages.{i}.tool_call_id", "a tool message needs the id of its call")
    if call_id not in names and not continued:
        raise ToolError(
            f"messages.{i}.tool_call_id",
            f"{call_id[:80]!r} is the id of no tool call in an earlier assistant message",
        )
    name = message.name or names.get(call_id, "")
    if support.native is not None:
        return {"role": "tool", "content": message.text(), "tool_call_id": call_id, "name": name}
    body = {"tool_response": {"name": name, "id": call_id, "content": message.text()}}
    role = "tool" if support.tool_role else "user"
    return {"role": role, "content": json.dumps(body, ensure_ascii=False)}


# ---- the generic format: prompt and grammar ------------------------------------------------------


def tool_prompt(tools: list[dict], choice: str, parallel: bool, response: dict | None) -> str:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    call = '{"name": "<tool name>", "arguments": {<arguments following its parameters>}}'
    if parallel:
        form = f'{{"tool_calls": [{call}, ...]}} (one or more calls)'
    else:
        form = f'{{"tool_call": {call}}}'
    lines = [
        "You can call these tools (name, description, and the JSON schema of the arguments):",
        listing,
        "",
        "Answer with one JSON object and nothing else.",
        f"To call a tool: {form}",
    ]
    if choice == "auto":
        answer = "<your answer>" if response is None else "<your answer as JSON>"
        lines.append(f'To answer the user directly: {{"response": "{answer}"}}')
        if response is not None:
            lines.append(f"The answer follows this JSON schema: {json.dumps(response)}")
    elif choice == "required":
        lines.append("You must call a tool.")
    elif choice != "none":
        lines.append(f"You must call the tool {choice}.")
    return "\n".join(lines)


def with_tool_prompt(messages: list[dict], prompt: str, has_system: bool) -> list[dict]:
    """The prompt in the system message (after its own text), or a new one at the start, or
    at the start of the first message where the template has no system role."""
    messages = [dict(m) for m in messages]
    first = messages[0]
    if first["role"] in ("system", "developer"):
        first["content"] = f"{first['content']}\n\n{prompt}" if first["content"] else prompt
    elif has_system:
        messages.insert(0, {"role": "system", "content": prompt})
    else:
        first["content"] = f"{prompt}\n\n{first['content']}"
    return messages


def generic_schema(tools: list[dict], choice: str, parallel: bool, response: dict | None) -> dict:
    """The JSON schema of a reply: a call (or calls) of the allowed tools, with arguments
    that follow their parameters, or (choice auto) a response."""
    defs: dict = {}
    calls = _calls_schema(tools, choice, defs, "arguments")
    if parallel:
        branch = _one_key("tool_calls", {"type": "array", "items": calls, "minItems": 1})
    else:
        branch = _one_key("tool_call", calls)
    if choice == "auto":
        answer = {"type": "string"} if response is None else _hoisted(response, "response", defs)
        branch = {"anyOf": [branch, _one_key("response", answer)]}
    return {**branch, "$defs": defs}


def _closed(node):
    """The schema with no extra properties where it names some and says nothing of others: a
    small model given the choice invents arguments (JSON Schema's default allows them)."""
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    result = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            result[key] = {name: _closed(sub) for name, sub in value.items()}
        else:
            result[key] = value if key in _NOT_SCHEMAS else _closed(value)
    if "properties" in result and not {"additionalProperties", "patternProperties"} & set(result):
        result["additionalProperties"] = False
    return result


def _one_key(key: str, schema: dict) -> dict:
    return {"type": "object", "properties": {key: schema}, "required": [key],
            "additionalProperties": False}  # fmt: skip


def _calls_schema(tools: list[dict], choice: str, defs: dict, arguments_key: str) -> dict:
    options = []
    for i, tool in enumerate(tools):
        if choice in ("auto", "required") or tool["name"] == choice:
            arguments = _hoisted(_closed(tool["parameters"]), f"tool{i}", defs)
            options.append({
                "type": "object",
                "properties": {"name": {"const": tool["name"]}, arguments_key: arguments},
                "required": ["name", arguments_key], "additionalProperties": False,
            })  # fmt: skip
    return options[0] if len(options) == 1 else {"anyOf": options}


def _hoisted(schema: dict, key: str, defs: dict) -> dict:
    """A reference to `schema` stored in the root's $defs under `key`, its own $defs (and
    definitions) beside it as `key.NAME`, every local $ref rewritten to match."""
    schema = dict(schema)
    for section in ("$defs", "definitions"):
        for name, sub in (schema.pop(section, None) or {}).items():
            defs[f"{key}.{name}"] = _rebased(sub, key)
    defs[key] = _rebased(schema, key)
    return {"$ref": f"#/$defs/{key}"}


_NOT_SCHEMAS = ("const", "enum", "default", "examples")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _rebased(node, key: str):
    if isinstance(node, list):
        return [_rebased(item, key) for item in node]
    if not isinstance(node, dict):
        return node
    result = {}
    for name, value in node.items():
        if name == "$ref" and isinstance(value, str):
            result[name] = _rebased_ref(value, key)
        elif name in _NOT_SCHEMAS:
            result[name] = value
        else:
            result[name] = _rebased(value, key)
    return result


def _rebased_ref(ref: str, key: str) -> str:
    for section in ("#/$defs/", "#/definitions/"):
        if ref.startswith(section):
            return f"#/$defs/{key}.{ref[len(section) :]}"
    if ref == "#" or ref.startswith("#/"):
        return f"#/$defs/{key}{ref[1:]}"
    return ref


# ---- native formats: the grammar of their calls ------------------------------------------------


def native_grammar(
    fmt: str, tools: list[dict], choice: str, parallel: bool, response: dict | None
) -> GuidedSpec | None:
    """A Lark grammar of the template's own call format for required or named choices (and
    for auto when the answer has a schema); None for auto with a free answer."""
    if choice == "auto" and response is None:
        return None
    defs: dict = {}
    key = "arguments" if fmt == "hermes" else "parameters"
    body = {**_calls_schema(tools, choice, defs, key), "$defs": defs, "x-guidance": COMPACT}
    if fmt == "hermes":
        call, separator = '"<tool_call>\\n" body "\\n</tool_call>"', '"\\n"'
    else:
        call, separator = "body", '"; "'
    calls = f"call ({separator} call)*" if parallel else "call"
    rules = [f"calls: {calls}", f"call: {call}", f"body: %json {json.dumps(body)}"]
    if choice == "auto":
        answer = {**response, "x-guidance": COMPACT}
        rules = ["start: calls | answer", *rules, f"answer: %json {json.dumps(answer)}"]
    else:
        rules = ["start: calls", *rules]
    return GuidedSpec("grammar", "\n".join(rules))
