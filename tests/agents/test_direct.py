"""The real agents against the scripted fake in their own dialect, with no gateway between.

These prove the harness (install, headless flags, fake provider) before the same runs are
pointed at the gateway: Claude Code on a native Messages provider, Codex on a native
Responses provider, each completing a task that needs one shell tool call.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.agents.clis import INSTALL_TIMEOUT, RUN_TIMEOUT, AgentRun
from tests.agents.conftest import AgentRunner, FakeStarter
from tests.fake_dialects import AgentScript, Received

# The first test also installs the CLIs (session fixture): allow for a cold npm cache.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(INSTALL_TIMEOUT + RUN_TIMEOUT)]

KEY = "sk-direct-test-key-5f1e2d3c"


def assert_task_done(run: AgentRun, nonce: str) -> None:
    assert run.returncode == 0, run.explain()
    written = run.workdir / "result.txt"
    assert written.is_file(), run.explain()
    assert written.read_text().strip() == nonce
    assert nonce in run.final_text, run.explain()


def bodies(requests: list[Received]) -> list[dict[str, object]]:
    return [r.json for r in requests]


@pytest.mark.parametrize(
    ("auth", "header", "value"),
    [("token", "authorization", f"Bearer {KEY}"), ("api_key", "x-api-key", KEY)],
)
def test_claude_code_runs_a_tool_on_a_native_messages_provider(
    start_fake: FakeStarter,
    run_claude: AgentRunner,
    agent_script: AgentScript,
    nonce: str,
    auth: str,
    header: str,
    value: str,
) -> None:
    fake = start_fake("messages", script=AgentScript(agent_script.command, reasoning=True))

    run = run_claude(fake.base_url, KEY, auth=auth)

    assert_task_done(run, nonce)
    calls = fake.received("/v1/messages")
    assert len(calls) == 2  # the tool call, then the answer: nothing else on the wire
    assert all(c.headers[header] == value for c in calls)
    assert all(c.headers["anthropic-version"] == "2023-06-01" for c in calls)
    first, second = bodies(calls)
    assert first["stream"] is True
    assert "Bash" in [tool["name"] for tool in first["tools"]]  # type: ignore[attr-defined]
    replayed, results = second["messages"][-2:]  # type: ignore[index]
    assert [b["type"] for b in replayed["content"]] == ["thinking", "tool_use"]
    assert results["content"][0]["type"] == "tool_result"
    assert nonce in results["content"][0]["content"]


@pytest.mark.parametrize("model", ["gpt-5.5", "qwen3-coder-plus"])
def test_codex_runs_a_tool_on_a_native_responses_provider(
    start_fake: FakeStarter,
    run_codex: AgentRunner,
    agent_script: AgentScript,
    nonce: str,
    model: str,
) -> None:
    fake = start_fake("responses", script=AgentScript(agent_script.command, reasoning=True))

    run = run_codex(fake.base_url, KEY, model=model)

    assert_task_done(run, nonce)
    calls = fake.received("/v1/responses")
    assert len(calls) == 2
    assert [r.method for r in fake.requests] == ["POST", "POST"]
    assert all(c.headers["authorization"] == f"Bearer {KEY}" for c in calls)
    assert all(c.headers["accept"] == "text/event-stream" for c in calls)
    first, second = bodies(calls)
    assert first["model"] == model
    assert first["stream"] is True and first["store"] is False
    assert "exec_command" in [tool.get("name") for tool in first["tools"]]  # type: ignore[attr-defined]
    replayed = [item["type"] for item in second["input"][-3:]]  # type: ignore[index]
    assert replayed == ["reasoning", "function_call", "function_call_output"]
    assert nonce in json.dumps(second["input"][-1])  # type: ignore[index]


def test_claude_code_keeps_its_state_in_the_throwaway_home(
    start_fake: FakeStarter, run_claude: AgentRunner, agent_dirs: tuple[Path, Path], nonce: str
) -> None:
    """Its config lands in the test's HOME, and the workdir holds only what the tool wrote."""
    fake = start_fake("messages")
    workdir, home = agent_dirs

    assert_task_done(run_claude(fake.base_url, KEY), nonce)

    assert (home / ".claude.json").is_file()
    assert sorted(p.name for p in workdir.iterdir()) == ["result.txt"]
