"""Fixtures for the tests that run the real coding agents (Claude Code, Codex).

The CLIs are installed with npm into `.cache/agents/` on first use (CI starts from a clean
clone); only a missing `npm` skips these tests. `run_claude` / `run_codex` take a base URL
and a key: a fake provider's `base_url` for the direct tests, the gateway's `url` for the
tests through it. `start_fake` starts a scripted provider (see `tests.fake_dialects`).
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.agents import clis
from tests.fake_dialects import AgentScript, FakeDialects

AgentRunner = Callable[..., clis.AgentRun]
FakeStarter = Callable[..., FakeDialects]


@pytest.fixture(scope="session")
def agent_prefix() -> Path:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the coding-agent CLIs are npm packages")
    try:
        clis.install_agents()
    except subprocess.CalledProcessError as error:
        output = (error.stderr or b"").decode(errors="replace")
        pytest.fail(f"npm install of the agent CLIs failed:\n{output}")
    return clis.PREFIX


@pytest.fixture(scope="session")
def claude_cli(agent_prefix: Path) -> Path:
    return clis.cli_path("claude", agent_prefix)


@pytest.fixture(scope="session")
def codex_cli(agent_prefix: Path) -> Path:
    return clis.cli_path("codex", agent_prefix)


@pytest.fixture
def nonce() -> str:
    """What the scripted tool call writes and the agent's final answer must quote."""
    return f"gateway-ok-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def agent_script(nonce: str) -> AgentScript:
    return AgentScript(command=f"echo {nonce} > result.txt && cat result.txt")


@pytest.fixture
def start_fake(agent_script: AgentScript) -> Iterator[FakeStarter]:
    """`start_fake("chat")` or `start_fake("messages", "responses")`: stopped at teardown."""
    started: list[FakeDialects] = []

    def start(*dialects: str, **options: Any) -> FakeDialects:
        fake = FakeDialects(frozenset(dialects), options.pop("script", agent_script), **options)
        started.append(fake.start())
        return fake

    yield start
    for fake in started:
        fake.stop()


@pytest.fixture
def agent_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """(workdir, home): where the agent works, and its throwaway HOME."""
    workdir, home = tmp_path / "work", tmp_path / "home"
    workdir.mkdir()
    home.mkdir()
    return workdir, home


@pytest.fixture
def run_claude(claude_cli: Path, agent_dirs: tuple[Path, Path]) -> AgentRunner:
    """`run_claude(base_url, key, **options)`; options as `clis.run_claude`."""
    workdir, home = agent_dirs

    def run(base_url: str, key: str, **options: Any) -> clis.AgentRun:
        return clis.run_claude(claude_cli, base_url, key, workdir, home, **options)

    return run


@pytest.fixture
def run_codex(codex_cli: Path, agent_dirs: tuple[Path, Path]) -> AgentRunner:
    """`run_codex(base_url, key, **options)`; options as `clis.run_codex`."""
    workdir, home = agent_dirs

    def run(base_url: str, key: str, **options: Any) -> clis.AgentRun:
        return clis.run_codex(codex_cli, base_url, key, workdir, home, **options)

    return run
