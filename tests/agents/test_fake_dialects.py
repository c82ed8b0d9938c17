"""The scripted fake provider read by the official SDKs: each dialect is well formed.

The gateway's tests trust these answers (the chat fake sits behind the gateway when it
bridges Messages or Responses), so their shapes are checked here, once, by real clients.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest
import requests

from tests.agents.conftest import FakeStarter
from tests.fake_dialects import AgentScript

pytestmark = pytest.mark.e2e

BASH: Any = {
    "name": "Bash",
    "description": "Runs a command",
    "input_schema": {
        "type": "object",
        "properties": {"command": {"type": "string"}, "description": {"type": "string"}},
        "required": ["command"],
    },
}
EXEC: Any = {
    "type": "function",
    "name": "exec_command",
    "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
}
CHAT_BASH: Any = {
    "type": "function",
    "function": {"name": "Bash", "parameters": BASH["input_schema"]},
}
SCRIPT = AgentScript(command="echo gateway-ok-x > result.txt", reasoning=True)


def test_messages_streams_a_tool_call_then_quotes_the_result(start_fake: FakeStarter) -> None:
    fake = start_fake("messages", script=SCRIPT)
    client = anthropic.Anthropic(base_url=fake.base_url, api_key="k", max_retries=0)
    asked: list[Any] = [{"role": "user", "content": "run it"}]
    thinking: Any = {"type": "enabled", "budget_tokens": 1024}

    with client.messages.stream(
        model="claude-sonnet-4-6", max_tokens=64, messages=asked, tools=[BASH], thinking=thinking
    ) as stream:
        message = stream.get_final_message()
    thought, call = message.content
    assert thought.type == "thinking" and thought.signature
    assert call.type == "tool_use" and call.input["command"] == SCRIPT.command
    assert message.stop_reason == "tool_use" and message.usage.input_tokens > 0

    result = {"type": "tool_result", "tool_use_id": call.id, "content": "gateway-ok-x\n"}
    asked += [
        {"role": "assistant", "content": message.content},
        {"role": "user", "content": [result]},
    ]
    answer = client.messages.create(model="m", max_tokens=64, messages=asked, tools=[BASH])
    assert answer.content[-1].text == "The command printed: gateway-ok-x"  # type: ignore[union-attr]
    assert client.messages.count_tokens(model="m", messages=asked).input_tokens > 0


def test_responses_streams_events_in_order_and_stores_them(start_fake: FakeStarter) -> None:
    fake = start_fake("responses", script=SCRIPT)
    client = openai.OpenAI(base_url=fake.url, api_key="k", max_retries=0)
    tools: Any = [EXEC]

    with client.responses.stream(
        model="m", input="run it", tools=tools, reasoning={"summary": "auto"}
    ) as stream:
        events = [event.type for event in stream]
        response = stream.get_final_response()
    assert events[:2] == ["response.created", "response.in_progress"]
    assert events[-1] == "response.completed"
    reasoning, call = response.output
    assert reasoning.type == "reasoning" and call.type == "function_call"
    assert json.loads(call.arguments) == {"cmd": SCRIPT.command}

    output: Any = {
        "type": "function_call_output",
        "call_id": call.call_id,
        "output": "gateway-ok-x",
    }
    second = client.responses.create(model="m", input=[output], tools=tools)
    assert second.output_text == "The command printed: gateway-ok-x"
    assert client.responses.retrieve(second.id).output_text == second.output_text
    assert client.responses.input_items.list(second.id).data[0].type == "function_call_output"
    client.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)


@pytest.mark.parametrize("include_usage", [True, False])
def test_chat_streams_in_openais_exact_shape(
    start_fake: FakeStarter, agent_script: AgentScript, include_usage: bool
) -> None:
    fake = start_fake("chat")
    body: Any = {
        "model": "m",
        "stream": True,
        "messages": [{"role": "user", "content": "run it"}],
        "tools": [CHAT_BASH],
        **({"stream_options": {"include_usage": True}} if include_usage else {}),
    }

    answer = requests.post(fake.url + "/chat/completions", json=body, timeout=10)
    lines = [line for line in answer.text.split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert all(("usage" in chunk) is include_usage for chunk in chunks)
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] > 0
        chunks = chunks[:-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    deltas = [c["choices"][0]["delta"].get("tool_calls", [{}])[0] for c in chunks]
    pieces = [d["function"]["arguments"] for d in deltas if "function" in d]
    assert len(pieces) > 2  # the arguments come split, as providers send them
    assert json.loads("".join(pieces))["command"] == agent_script.command


def test_chat_answers_with_the_tool_output_once_it_has_it(start_fake: FakeStarter) -> None:
    fake = start_fake("chat", script=SCRIPT)
    client = openai.OpenAI(base_url=fake.url, api_key="k", max_retries=0)
    call = {"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": "{}"}}
    messages: Any = [
        {"role": "user", "content": "run it"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "gateway-ok-x"},
    ]
    tools: Any = [CHAT_BASH]

    stream = client.chat.completions.create(model="m", messages=messages, tools=tools, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)

    assert text == "The command printed: gateway-ok-x"


def test_a_dialect_not_enabled_is_a_404(start_fake: FakeStarter) -> None:
    """A chat-only fake is a provider that the gateway must translate for."""
    fake = start_fake("chat")

    assert requests.post(fake.url + "/messages", json={}, timeout=5).status_code == 404
    assert requests.post(fake.url + "/responses", json={}, timeout=5).status_code == 404
    assert requests.get(fake.url + "/models", timeout=5).status_code == 200
