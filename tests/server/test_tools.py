"""Tool calling without a model: the grammar built from the tools' schemas (checked with
llguidance over a byte-level tokenizer and with jsonschema), the reply parser of each format,
the stream splitter (any cut of the text reassembles to the same calls), the prompt and the
history as a template gets them."""

import json
import random

import jsonschema
import pytest
from tokenizers import Tokenizer
from tokenizers import models as token_models
from transformers import PreTrainedTokenizerFast

from server.guided import GuidedDecoding
from server.protocol import ChatCompletionRequest
from server.request import GuidedSpec
from server.tool_stream import assemble, make_splitter, parse_reply
from server.tools import (
    TemplateSupport,
    ToolError,
    generic_schema,
    history_messages,
    native_grammar,
    plan_chat,
)
from tests.server.conftest import byte_level_tokenizer

ADDRESS = {
    "type": "object",
    "properties": {"street": {"type": "string"}, "zip": {"type": "string", "pattern": "[0-9]{5}"}},
    "required": ["street", "zip"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
    {
        "name": "ship",
        "description": "Ship items to addresses",
        "parameters": {
            "type": "object",
            "$defs": {
                "address": ADDRESS,
                "item": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "integer"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "parts": {"type": "array", "items": {"$ref": "#/$defs/item"}},
                    },
                    "required": ["sku"],
                    "additionalProperties": False,
                },
            },
            "properties": {
                "to": {"$ref": "#/$defs/address"},
                "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1},
                "note": {"type": "string"},
            },
            "required": ["to", "items"],
            "additionalProperties": False,
        },
    },
    {"name": "ping", "description": "", "parameters": {"type": "object", "properties": {}}},
]
SHIP = {
    "to": {"street": 'Rue "du} {Bac" \\ 12', "zip": "75007"},
    "items": [{"sku": 1, "tags": ["é", "日本", "😀"], "parts": [{"sku": 2, "parts": []}]}],
    "note": "braces } { and quotes \" ' and a newline \n",
}


def _compact(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@pytest.fixture(scope="module")
def guided() -> GuidedDecoding:
    return GuidedDecoding(byte_level_tokenizer(), 257)


def accepts(guided: GuidedDecoding, spec: GuidedSpec, text: str) -> bool:
    """Whether the grammar takes `text` whole (byte tokens, as a model would emit them)."""
    matcher = guided.matcher(spec)
    ids = guided.hf_tokenizer(text, add_special_tokens=False).input_ids
    return matcher.consume_tokens(ids) and matcher.is_accepting()


def call(name: str, arguments: dict, key: str = "tool_call") -> str:
    return _compact({key: {"name": name, "arguments": arguments}})


GOOD = [
    call("get_weather", {"city": 'Zürich {"x"}', "unit": "c"}),
    call("ship", SHIP),
    call("ping", {}),
]
BAD = [
    call("get_weather", {"city": "Paris", "unit": "k"}),  # not in the enum
    call("get_weather", {"city": "Paris"}),  # a required argument missing
    call("ship", {**SHIP, "to": {"street": "x", "zip": "123"}}),  # the $defs pattern
    call("ship", {**SHIP, "items": [{"sku": "one"}]}),  # nested type
    call("nope", {}),  # no such tool
    _compact({"response": "hi"}),  # required: no answer
    '{"tool_call": {"name": "ping", "arguments": {}}}',  # whitespace: the format is compact
]


@pytest.mark.parametrize("text", GOOD)
def test_the_grammar_takes_every_valid_call(guided, text):
    schema = generic_schema(TOOLS, "required", False, None)
    jsonschema.validate(json.loads(text), schema)
    assert accepts(guided, GuidedSpec.json_schema(schema), text)


@pytest.mark.parametrize("text", BAD)
def test_the_grammar_refuses_what_the_schemas_do_not_allow(guided, text):
    schema = generic_schema(TOOLS, "required", False, None)
    assert not accepts(guided, GuidedSpec.json_schema(schema), text)


def test_choices_parallel_calls_and_the_answer_branch(guided):
    named = GuidedSpec.json_schema(generic_schema(TOOLS, "ping", False, None))
    assert accepts(guided, named, call("ping", {}))
    assert not accepts(guided, named, GOOD[0])
    parallel = GuidedSpec.json_schema(generic_schema(TOOLS, "required", True, None))
    calls = {"tool_calls": [{"name": "ping", "arguments": {}}, {"name": "ship", "arguments": SHIP}]}
    assert accepts(guided, parallel, _compact(calls))
    assert not accepts(guided, parallel, _compact({"tool_calls": []}))
    auto = GuidedSpec.json_schema(generic_schema(TOOLS, "auto", False, None))
    assert accepts(guided, auto, _compact({"response": 'a "quoted" } answer'}))
    assert accepts(guided, auto, GOOD[1])
    person = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    answer = GuidedSpec.json_schema(generic_schema(TOOLS, "auto", False, person))
    assert accepts(guided, answer, '{"response":{"age":3}}')
    assert not accepts(guided, answer, '{"response":"three"}')


def test_native_grammars(guided):
    hermes = native_grammar("hermes", TOOLS, "required", True, None)
    one = '<tool_call>\n{"name":"ping","arguments":{}}\n</tool_call>'
    assert accepts(guided, hermes, one) and accepts(guided, hermes, f"{one}\n{one}")
    assert not accepts(guided, hermes, "hello")
    llama = native_grammar("llama3_json", TOOLS, "get_weather", False, None)
    assert accepts(guided, llama, '{"name":"get_weather","parameters":{"city":"x","unit":"f"}}')
    assert native_grammar("hermes", TOOLS, "auto", False, None) is None  # a free answer


# ---- parsing and streaming -----------------------------------------------------------------------

REPLIES = [
    ("generic", call("ship", SHIP)),
    (
        "generic",
        _compact(
            {"tool_calls": [{"name": "ping", "arguments": {}}, {"name": "ship", "arguments": SHIP}]}
        ),
    ),
    ("generic", _compact({"response": 'it is "sunny" {} \\ 😀 \n done'})),
    ("generic", json.dumps({"response": "escaped é 😀"})),  # \u escapes, a surrogate pair
    ("generic", '{"response":{"age":3,"tags":["}"]}}'),
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "</tool_call> {", "unit": "c"}}\n</tool_call>\n<tool_call>\n'
        '{"arguments": {}, "name": "ping"}\n</tool_call>',
    ),
    ("hermes", "No call here, <tool but not quite."),
    ("llama3_json", '<|python_tag|>{"name": "ship", "parameters": ' + json.dumps(SHIP) + "}"),
    ("llama3_json", '{"name": "ping", "parameters": {}}; {"name": "ping", "parameters": {}}'),
    ("llama3_json", "Plain text."),
]


def test_the_parser_reads_every_format():
    ship = parse_reply("generic", REPLIES[0][1])
    assert ship.content is None and len(ship.calls) == 1
    assert ship.calls[0].name == "ship" and json.loads(ship.calls[0].arguments) == SHIP
    assert ship.calls[0].id.startswith("call_")
    two = parse_reply("generic", REPLIES[1][1])
    assert [c.name for c in two.calls] == ["ping", "ship"]
    assert len({c.id for c in two.calls}) == 2
    assert parse_reply("generic", REPLIES[2][1]).content == 'it is "sunny" {} \\ 😀 \n done'
    assert parse_reply("generic", REPLIES[3][1]).content == "escaped é 😀"
    assert parse_reply("generic", REPLIES[4][1]).content == '{"age":3,"tags":["}"]}'
    hermes = parse_reply("hermes", REPLIES[5][1])
    assert hermes.content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in hermes.calls] == [
        ("get_weather", {"city": "</tool_call> {", "unit": "c"}),
        ("ping", {}),
    ]
    assert parse_reply("hermes", REPLIES[6][1]).content == REPLIES[6][1]
    assert json.loads(parse_reply("llama3_json", REPLIES[7][1]).calls[0].arguments) == SHIP
    assert len(parse_reply("llama3_json", REPLIES[8][1]).calls) == 2
    assert parse_reply("llama3_json", REPLIES[9][1]).content == "Plain text."


def test_a_reply_cut_short_or_malformed_is_content():
    cut = call("ship", SHIP)[:40]
    assert parse_reply("generic", cut).content == cut and not parse_reply("generic", cut).calls
    broken = '<tool_call>\n{"name": "ping", "arguments": {"a": tru}}\n</tool_call>'
    assert parse_reply("hermes", broken).content == broken


@pytest.mark.parametrize(("fmt", "text"), REPLIES)
def test_stream_pieces_reassemble_to_the_parsed_reply(fmt, text):
    whole = parse_reply(fmt, text)
    rng = random.Random(0)
    for _ in range(30):
        splitter, pieces, at = make_splitter(fmt), [], 0
        while at < len(text):
            size = rng.choice([1, 1, 2, 3, 7])
            pieces += splitter.feed(text[at : at + size])
            at += size
        pieces += splitter.finish()
        streamed = assemble(pieces)
        assert streamed.content == whole.content
        assert [(c.name, c.arguments) for c in streamed.calls] == [
            (c.name, c.arguments) for c in whole.calls
        ]
        firsts = {}
        for piece in pieces:  # id and name in a call's first piece only
            if isinstance(piece, str):
                assert "tool_call" not in piece or (fmt == "hermes" and not whole.calls)
                continue
            assert (piece.index not in firsts) == (piece.id is not None) == (piece.name is not None)
            firsts.setdefault(piece.index, piece.id)


# ---- prompt and history --------------------------------------------------------------------------

FUNCTIONS = [{"type": "function", "function": t} for t in TOOLS]
GENERIC = TemplateSupport(native=None, system=True, tool_role=True)
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
]  # fmt: skip


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", **fields})


class Template:
    """A stand-in tokenizer that renders with a given template."""

    def __init__(self, template: str) -> None:
        self.chat_template = template
        self.hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(token_models.BPE({}, [])))
        self.hf.chat_template = template

    def apply_chat_template(self, messages, **kwargs):
        return self.hf.apply_chat_template(messages, **kwargs)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
    "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
)


def test_history_renders_calls_and_results_with_the_name_looked_up():
    messages = history_messages(request(messages=HISTORY).messages, GENERIC)
    assert json.loads(messages[1]["content"]) == {
        "tool_call": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}
    }
    assert messages[2]["role"] == "tool"
    result = json.loads(messages[2]["content"])["tool_response"]
    assert result == {"name": "get_weather", "id": "call_1", "content": "21 C"}
    native = TemplateSupport(native="hermes", system=True, tool_role=True)
    messages = history_messages(request(messages=HISTORY).messages, native)
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "c"}
    assert messages[2]["name"] == "get_weather"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([*HISTORY[:2], {**HISTORY[2], "tool_call_id": "call_9"}], "messages.2.tool_call_id"),
        ([HISTORY[0], {"role": "tool", "content": "x"}], "messages.1.tool_call_id"),
        ([HISTORY[0], HISTORY[2]], "messages.1.tool_call_id"),
    ],
)
def test_a_result_of_no_call_is_refused(messages, param):
    with pytest.raises(ToolError) as error:
        history_messages(request(messages=messages).messages, GENERIC)
    assert error.value.param == param and "tool" in str(error.value)


def test_the_prompt_goes_into_the_system_message_or_the_first_user_turn():
    tokenizer = Template(CHATML)
    plan = plan_chat(request(messages=HISTORY, tools=FUNCTIONS), tokenizer)
    assert plan.format == "generic" and plan.messages[0]["role"] == "system"
    assert '"name": "ship"' in plan.messages[0]["content"] and plan.history == plan.messages[1:]
    own = [{"role": "system", "content": "Be brief."}, HISTORY[0]]
    plan = plan_chat(request(messages=own, tools=FUNCTIONS, tool_choice="required"), tokenizer)
    assert plan.messages[0]["content"].startswith("Be brief.\n\n")
    assert "must call a tool" in plan.messages[0]["content"]
    assert '"response"' not in plan.messages[0]["content"]
    plan = plan_chat(request(messages=HISTORY, tools=FUNCTIONS), Template(NO_SYSTEM))
    assert plan.messages[0]["role"] == "user"
    assert plan.messages[0]["content"].endswith("Weather in Paris?")
    assert '"name": "get_weather"' in plan.messages[0]["content"]
    assert plan.messages[2]["role"] == "tool"  # this template renders any role


def test_choice_none_is_a_plain_chat():
    plan = plan_chat(request(messages=HISTORY[:1], tools=FUNCTIONS, tool_choice="none"),
                     Template(CHATML))  # fmt: skip
    assert plan.format is None and plan.guided is None
    assert plan.messages == [{"role": "user", "content": "Weather in Paris?"}]


def test_arguments_get_no_properties_their_schema_does_not_name(guided):
    """JSON Schema allows unnamed properties by default; a small model given them invents
    arguments, so the grammar allows them only where the schema says so."""
    loose = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},
            "extra": {"type": "object", "additionalProperties": True},
        },
    }
    tools = [{"name": "f", "description": "", "parameters": loose}]
    spec = GuidedSpec.json_schema(generic_schema(tools, "required", False, None))
    assert accepts(guided, spec, call("f", {"properties": {"x": 1}, "extra": {"any": 2}}))
    assert not accepts(guided, spec, call("f", {"properties": {"x": 1}, "y": 2}))
    assert not accepts(guided, spec, call("f", {"properties": {"x": 1, "y": 2}}))


def test_a_continued_session_answers_calls_its_saved_state_holds():
    """With a session the client sends only its new turns: a result may answer a call that
    only the saved state has seen."""
    messages = request(messages=[HISTORY[2]]).messages
    out = history_messages(messages, GENERIC, continued=True)
    assert json.loads(out[0]["content"])["tool_response"]["id"] == "call_1"
    with pytest.raises(ToolError):
        history_messages(messages, GENERIC)
