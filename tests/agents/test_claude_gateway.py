"""Claude Code itself (`claude -p`) through the gateway under real gunicorn.

Bridged: the gateway's only provider is the chat-mode fake, so every Messages request Claude
Code sends is translated to Chat Completions and back, tool call included. Native: the
provider serves Messages itself and gets the request nearly as sent. Either way the task
(one Bash call, then a final answer quoting its output) must complete, the provider must
see nothing only Anthropic understands, and the access log must count the gateway key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agents.clis import INSTALL_TIMEOUT, RUN_TIMEOUT
from tests.agents.conftest import AgentRunner, FakeStarter
from tests.agents.test_direct import assert_task_done
from tests.constants import GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.fake_dialects import AgentScript

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(INSTALL_TIMEOUT + RUN_TIMEOUT)]

PROVIDER_KEY = "sk-agent-provider-e2e-13579bdf"
FORBIDDEN_TEXT = ("cache_control", "context_management", "output_config", "billing-header")
GATEWAY_KEY_ID = "key_" + hashlib.sha256(GATEWAY_KEY.encode()).hexdigest()[:12]
FORBIDDEN_FIELDS = {"thinking", "metadata", "betas", "system", "effort"}


def config(url: str, *, native: bool) -> str:
    return f"""
providers:
  fake:
    base_url: {url}
    api_key_env: PROVIDER_KEY
    native: [{"messages" if native else ""}]
models:
  claude-*:
    - {{provider: fake, model: qwen3-coder-plus}}
"""


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[GatewayFactory]:
    factory = GatewayFactory(tmp_path, "http://127.0.0.1:9/v1")  # every route is configured
    yield factory
    factory.stop_all()


def gateway_for(start_gateway: GatewayFactory, url: str, *, native: bool) -> Gateway:
    return start_gateway(
        config(url, native=native),
        PROVIDER_KEY=PROVIDER_KEY,
        RATE_LIMIT_REQUESTS_PER_MINUTE="0",
    )


def access_lines(gateway: Gateway) -> list[dict[str, Any]]:
    lines = (json.loads(x) for x in gateway.logs().splitlines() if x.startswith("{"))
    return [x for x in lines if x.get("event") == "access" and x["path"] == "/v1/messages"]


@pytest.mark.parametrize("auth", ["token", "api_key"])
def test_claude_code_completes_a_tool_task_bridged_to_a_chat_provider(
    start_fake: FakeStarter,
    start_gateway: GatewayFactory,
    run_claude: AgentRunner,
    agent_script: AgentScript,
    nonce: str,
    auth: str,
) -> None:
    fake = start_fake("chat", script=AgentScript(agent_script.command, reasoning=True))
    gateway = gateway_for(start_gateway, fake.url, native=False)

    run = run_claude(gateway.url, GATEWAY_KEY, auth=auth)

    assert_task_done(run, nonce)
    calls = fake.received("/v1/chat/completions")
    assert len(calls) >= 2, run.explain()
    for call in calls:
        text = call.body.decode()
        assert not [word for word in FORBIDDEN_TEXT if word in text], text[:3000]
        assert not FORBIDDEN_FIELDS & set(call.json), sorted(call.json)
        assert not [h for h in call.headers if h.startswith("anthropic-") or h == "x-api-key"]
        assert call.headers["authorization"] == f"Bearer {PROVIDER_KEY}"
        assert GATEWAY_KEY not in text and GATEWAY_KEY not in str(call.headers)
        assert call.json["model"] == "qwen3-coder-plus"
    tooled = [c.json for c in calls if c.json.get("tools")]
    names = {tool["function"]["name"] for body in tooled for tool in body["tools"]}
    assert "Bash" in names
    assert all(t["type"] == "function" for b in tooled for t in b["tools"])
    assert all(
        b["stream"] is True and b["stream_options"] == {"include_usage": True} for b in tooled
    )
    last = tooled[-1]["messages"]
    result = next(m for m in reversed(last) if m["role"] == "tool")
    assert nonce in result["content"]
    call_turn = next(m for m in reversed(last) if m.get("tool_calls"))
    assert call_turn["tool_calls"][0]["id"] == result["tool_call_id"]
    lines = access_lines(gateway)
    assert len(lines) == len(calls)
    assert {(line["status"], line["key_id"]) for line in lines} == {(200, GATEWAY_KEY_ID)}
    assert all(line["usage"]["prompt_tokens"] > 0 for line in lines)
    assert "usage_estimated" not in lines[-1]


def test_claude_code_completes_a_tool_task_on_a_native_provider(
    start_fake: FakeStarter,
    start_gateway: GatewayFactory,
    run_claude: AgentRunner,
    agent_script: AgentScript,
    nonce: str,
) -> None:
    fake = start_fake("messages", script=AgentScript(agent_script.command, reasoning=True))
    gateway = gateway_for(start_gateway, fake.base_url, native=True)

    run = run_claude(gateway.url, GATEWAY_KEY)

    assert_task_done(run, nonce)
    calls = fake.received("/v1/messages")
    assert len(calls) == 2, run.explain()
    for call in calls:
        assert call.headers["x-api-key"] == PROVIDER_KEY
        assert GATEWAY_KEY not in str(call.headers) and GATEWAY_KEY not in call.body.decode()
        assert "anthropic-beta" not in call.headers
        assert b"x-anthropic-billing-header" not in call.body
        assert call.json["model"] == "qwen3-coder-plus"
    replayed, results = calls[1].json["messages"][-2:]
    assert [b["type"] for b in replayed["content"]] == ["thinking", "tool_use"]
    assert nonce in json.dumps(results["content"])
    lines = access_lines(gateway)
    assert len(lines) == 2
    assert {(line["status"], line["key_id"]) for line in lines} == {(200, GATEWAY_KEY_ID)}
    assert all(line["usage"]["completion_tokens"] == 12 for line in lines)
