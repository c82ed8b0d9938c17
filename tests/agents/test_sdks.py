"""The SDKs whose default OpenAI model speaks Responses, through the gateway bridged to a
chat-only provider: the OpenAI Agents SDK running a function tool, and the Vercel AI SDK's
`generateText` (npm `ai` + `@ai-sdk/openai`, installed into `.cache/sdks/` on first use).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from agents import (
    Agent,
    Runner,
    function_tool,
    set_default_openai_api,
    set_default_openai_client,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

from tests.agents import clis
from tests.constants import GATEWAY_KEY
from tests.e2e.conftest import REPO, Gateway, GatewayFactory
from tests.fake_dialects import AgentScript, FakeDialects

pytestmark = pytest.mark.e2e


@pytest.fixture
def chat_fake() -> Iterator[FakeDialects]:
    fake = FakeDialects(frozenset({"chat"}), AgentScript(command="echo sdk-ok")).start()
    yield fake
    fake.stop()


@pytest.fixture
def gateway(tmp_path: Path, chat_fake: FakeDialects) -> Iterator[Gateway]:
    factory = GatewayFactory(tmp_path, chat_fake.url)
    yield factory(RATE_LIMIT_REQUESTS_PER_MINUTE="0")
    factory.stop_all()


def test_the_agents_sdk_runs_a_function_tool_through_the_gateway(
    gateway: Gateway, chat_fake: FakeDialects
) -> None:
    ran: list[str] = []

    @function_tool
    def shell(command: str) -> str:
        """Run a shell command and return what it printed."""
        ran.append(command)
        return "sdk-ok"

    set_tracing_disabled(True)
    set_default_openai_api("responses")
    client = AsyncOpenAI(base_url=gateway.url + "/v1", api_key=GATEWAY_KEY, max_retries=0)
    set_default_openai_client(client, use_for_tracing=False)
    agent = Agent(name="runner", instructions="Use the shell.", tools=[shell], model="qwen-plus")

    result = Runner.run_sync(agent, "Run echo and tell me what it printed.", max_turns=4)

    assert ran == ["echo sdk-ok"]
    assert result.final_output == "The command printed: sdk-ok"
    first, second = (r.json for r in chat_fake.received("/v1/chat/completions"))
    assert first["messages"][0] == {"role": "system", "content": "Use the shell."}
    assert first["tools"][0]["function"]["name"] == "shell"
    assert second["messages"][-1]["role"] == "tool"
    assert second["messages"][-1]["content"] == "sdk-ok"


# --- the Vercel AI SDK ----------------------------------------------------------------------
AI_SDK = {"ai": "5.0.277", "@ai-sdk/openai": "2.0.131"}
AI_SDK_PREFIX = REPO / ".cache" / "sdks"
# `openai(model)` is the Responses API in @ai-sdk/openai 2.
GENERATE = """
const { generateText } = require("ai");
const { createOpenAI } = require("@ai-sdk/openai");
const openai = createOpenAI({ baseURL: process.env.BASE_URL, apiKey: process.env.KEY });
generateText({ model: openai("qwen-plus"), prompt: "Say OK", maxRetries: 0 })
  .then((r) => console.log(JSON.stringify({ text: r.text, usage: r.usage })))
  .catch((e) => { console.error(e); process.exit(1); });
"""


@pytest.fixture(scope="session")
def ai_sdk() -> Path:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the AI SDK is an npm package")
    AI_SDK_PREFIX.mkdir(parents=True, exist_ok=True)
    (AI_SDK_PREFIX / ".gitignore").write_text("*\n")
    with clis.locked(AI_SDK_PREFIX / ".install.lock"):
        missing = [
            f"{p}@{v}" for p, v in AI_SDK.items() if clis.installed_version(p, AI_SDK_PREFIX) != v
        ]
        if missing:
            command = ["npm", "install", "--prefix", str(AI_SDK_PREFIX), "--save-exact"]
            command += ["--no-audit", "--no-fund", "--loglevel=error", *missing]
            subprocess.run(command, check=True, timeout=clis.INSTALL_TIMEOUT, capture_output=True)
    script = AI_SDK_PREFIX / "generate.cjs"
    script.write_text(GENERATE)
    return script


def test_the_ai_sdks_default_openai_provider_works_through_the_gateway(
    gateway: Gateway, chat_fake: FakeDialects, ai_sdk: Path
) -> None:
    env = clis.base_env(ai_sdk.parent)
    env.update(BASE_URL=gateway.url + "/v1", KEY=GATEWAY_KEY)

    done = subprocess.run(
        ["node", str(ai_sdk)],
        cwd=ai_sdk.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["text"] == "OK"
    assert answer["usage"]["outputTokens"] == 12
    (sent,) = chat_fake.received("/v1/chat/completions")
    assert sent.json["messages"] == [{"role": "user", "content": "Say OK"}]
