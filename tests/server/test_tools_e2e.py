"""Tool calling end to end on the real default model (a template without tool support: the
generic format), through the clients people use: the `openai` SDK (a call, and a stream read
by its accumulator), LangChain (`bind_tools` with a named choice, `with_structured_output` by
function calling) and a LangGraph ReAct agent running a real Python tool. One server process
for the module. Slow: loads and warms up the model."""

import json

import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.prebuilt import create_react_agent
from pydantic import BaseModel, Field

from models.registry import DEFAULT_MODEL
from tests.server.conftest import ServeProcess

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40},
                   "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": WEATHER}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
]  # fmt: skip
QUESTION = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
def base_url():
    env = {"LLN_SERVE_MAX_NUM_SEQS": "4", "LLN_SERVE_DETERMINISTIC": "1"}
    server = ServeProcess(["--model", DEFAULT_MODEL], env).wait_ready(600)
    yield f"{server.url}/v1"
    server.stop()


def chat_model(base_url: str, **fields) -> ChatOpenAI:
    return ChatOpenAI(model=DEFAULT_MODEL, base_url=base_url, api_key="unused", max_retries=0,
                      temperature=0, max_tokens=80, **fields)  # fmt: skip


def test_the_openai_sdk_calls_a_tool_and_streams_one(base_url):
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required",
        temperature=0, max_tokens=80,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER)
    assert "paris" in arguments["city"].lower()
    with client.chat.completions.stream(
        model=DEFAULT_MODEL, messages=QUESTION, tools=TOOLS, tool_choice="required",
        temperature=0, max_tokens=80,
    ) as stream:  # fmt: skip
        final = stream.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls" and not streamed.message.content
    assert streamed.message.tool_calls[0].function.name == call.function.name
    assert json.loads(streamed.message.tool_calls[0].function.arguments) == arguments


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(description="the person's first name", max_length=30)
    age: int = Field(description="the person's age in years", ge=0, le=150)


def test_langchain_bind_tools_with_a_named_choice_and_structured_output(base_url):
    llm = chat_model(base_url)
    bound = llm.bind_tools(TOOLS, tool_choice="get_time")
    message = bound.invoke("What time is it in Tokyo?")
    assert isinstance(message, AIMessage) and len(message.tool_calls) == 1
    assert message.tool_calls[0]["name"] == "get_time"
    assert isinstance(message.tool_calls[0]["args"]["city"], str)
    structured = llm.with_structured_output(Person, method="function_calling")
    person = structured.invoke("Alice is 31 years old. Extract the person.")
    assert isinstance(person, Person) and person.name


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def test_a_langgraph_react_agent_runs_a_python_tool_and_ends_with_an_answer(base_url):
    agent = create_react_agent(chat_model(base_url), [multiply])
    state = agent.invoke(
        {"messages": [("user", "Use the multiply tool to compute 17 times 23.")]},
        {"recursion_limit": 12},
    )
    messages = state["messages"]
    assert isinstance(messages[-1], AIMessage) and not messages[-1].tool_calls
    results = [m for m in messages if isinstance(m, ToolMessage)]
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert len(results) == len(calls)
    assert all(call["name"] == "multiply" for call in calls)
