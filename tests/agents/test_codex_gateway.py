"""Codex itself (`codex exec`) through the gateway under real gunicorn, completing a task that
needs one shell tool call: bridged to a chat-only provider, and relayed to a native one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agents.clis import INSTALL_TIMEOUT, RUN_TIMEOUT
from tests.agents.conftest import AgentRunner, FakeStarter
from tests.agents.test_direct import assert_task_done
from tests.constants import GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.fake_dialects import Received

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(INSTALL_TIMEOUT + RUN_TIMEOUT)]

NATIVE_KEY = "sk-native-codex-provider-0123456789"
# Responses-only fields Codex sends, none of which a chat provider may see.
RESPONSES_ONLY = {
    "input",
    "include",
    "store",
    "client_metadata",
    "metadata",
    "reasoning",
    "text",
    "prompt_cache_key",
}


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Any]:
    factories: list[GatewayFactory] = []

    def start(upstream_url: str, config: str | None = None, **env: str) -> Gateway:
        factory = GatewayFactory(tmp_path / f"gateway-{len(factories)}", upstream_url)
        factory.tmp_path.mkdir()
        factories.append(factory)
        return factory(config, RATE_LIMIT_REQUESTS_PER_MINUTE="0", **env)

    yield start
    for factory in factories:
        factory.stop_all()


def bodies(received: list[Received]) -> list[dict[str, Any]]:
    return [r.json for r in received]


def access_lines(gateway: Gateway, expected: int) -> list[dict[str, Any]]:
    """Access lines of POST /v1/responses, once `expected` are written (bounded)."""
    lines: list[dict[str, Any]] = []
    for _ in range(100):
        lines = [
            entry
            for entry in (json.loads(x) for x in gateway.logs().splitlines() if x.startswith("{"))
            if entry.get("event") == "access" and entry.get("path") == "/v1/responses"
        ]
        if len(lines) >= expected:
            break
        time.sleep(0.05)
    return lines


def test_codex_runs_a_tool_through_the_gateway_bridged_to_a_chat_provider(
    start_fake: FakeStarter, start_gateway: Any, run_codex: AgentRunner, nonce: str
) -> None:
    fake = start_fake("chat")
    gateway = start_gateway(fake.url)

    run = run_codex(gateway.url, GATEWAY_KEY)

    assert_task_done(run, nonce)
    first, second = bodies(fake.received("/v1/chat/completions"))
    for body in (first, second):
        assert not RESPONSES_ONLY & body.keys(), body.keys()
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert all(tool["type"] == "function" for tool in body["tools"])
        roles = [m["role"] for m in body["messages"]]
        assert roles[0] == "system" and "system" not in roles[1:] and "developer" not in roles
    names = [tool["function"]["name"] for tool in first["tools"]]
    assert "exec_command" in names
    # The call comes back as an assistant message with tool_calls, its output as role tool.
    called, result = second["messages"][-2:]
    assert called["role"] == "assistant"
    assert called["tool_calls"][0]["function"]["name"] == "exec_command"
    assert result["role"] == "tool"
    assert result["tool_call_id"] == called["tool_calls"][0]["id"]
    assert nonce in result["content"]
    # Counted against the key: the provider's usage, not an estimate.
    lines = access_lines(gateway, 2)
    assert [line["status"] for line in lines] == [200, 200]
    for line in lines:
        assert line["key_id"] and line["stream"] is True
        assert line["usage"]["prompt_tokens"] > 0 and line["usage"]["completion_tokens"] == 12
        assert "usage_estimated" not in line


def test_codex_runs_a_tool_through_the_gateway_on_a_native_responses_provider(
    start_fake: FakeStarter, start_gateway: Any, run_codex: AgentRunner, nonce: str
) -> None:
    fake = start_fake("responses")
    config = f"""
providers:
  native:
    base_url: {fake.url}
    api_key_env: NATIVE_KEY
    native: [responses]
models:
  gpt-5.5:
    - {{provider: native, model: gpt-5-codex}}
"""
    gateway = start_gateway(fake.url, config, NATIVE_KEY=NATIVE_KEY)

    run = run_codex(gateway.url, GATEWAY_KEY)

    assert_task_done(run, nonce)
    calls = fake.received("/v1/responses")
    assert len(calls) == 2
    assert all(c.headers["authorization"] == f"Bearer {NATIVE_KEY}" for c in calls)
    first, second = bodies(calls)
    assert first["model"] == second["model"] == "gpt-5-codex"  # the alias, rewritten
    assert first["store"] is False and "client_metadata" in first  # relayed as sent
    assert second["input"][-1]["type"] == "function_call_output"
    lines = access_lines(gateway, 2)
    assert [line["status"] for line in lines] == [200, 200]
    assert all(line["usage"]["prompt_tokens"] > 0 for line in lines)
