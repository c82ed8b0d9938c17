"""The real coding agents, installed on demand and run headless against a base URL.

Claude Code (`@anthropic-ai/claude-code`) and Codex (`@openai/codex`) are installed with npm
into `.cache/agents/` (ignored by git), at pinned versions. `run_claude` and `run_codex` run
one task with a fresh HOME, telemetry and updates off, so the only traffic goes to the base
URL given: a fake provider (`tests.fake_dialects`) or the gateway, nothing else to change.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PREFIX = REPO / ".cache" / "agents"
VERSIONS = {"@anthropic-ai/claude-code": "2.1.328", "@openai/codex": "0.169.0"}
BINARIES = {"claude": "@anthropic-ai/claude-code", "codex": "@openai/codex"}
# One agent task must end well within pytest's own 120 s timeout.
RUN_TIMEOUT = 100.0
INSTALL_TIMEOUT = 600.0
TASK = "Run the shell command that writes result.txt, then tell me what it printed."
# Current names get adaptive thinking + effort; an older one (claude-sonnet-4-5) a budget.
CLAUDE_MODEL = "claude-sonnet-4-6"
CODEX_MODEL = "gpt-5.5"
CODEX_KEY_VARIABLE = "GATEWAY_API_KEY"


@dataclass
class AgentRun:
    returncode: int
    stdout: str
    stderr: str
    workdir: Path
    final_text: str  # the agent's last answer, parsed from its JSON output ("" if none)

    def explain(self) -> str:
        """For assertion messages: everything the agent printed."""
        return f"exit {self.returncode}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


# --- installing ---------------------------------------------------------------------------
def installed_version(package: str, prefix: Path = PREFIX) -> str | None:
    manifest = prefix / "node_modules" / package / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def install_agents(prefix: Path = PREFIX) -> None:
    """`npm install` the pinned CLIs into `prefix` unless they are there already.

    A lock file keeps parallel test processes from installing at the same time.
    """
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("npm")
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / ".gitignore").write_text("*\n")  # the prefix ignores itself
    with locked(prefix / ".install.lock"):
        missing = [f"{p}@{v}" for p, v in VERSIONS.items() if installed_version(p, prefix) != v]
        if not missing:
            return
        # The agents' native binaries come with optional, per-platform packages: keep them.
        command = [npm, "install", "--prefix", str(prefix), "--save-exact", "--no-audit"]
        command += ["--no-fund", "--include=optional", "--loglevel=error", *missing]
        subprocess.run(command, check=True, timeout=INSTALL_TIMEOUT, capture_output=True)
        link_claude_binary(prefix)


def link_claude_binary(prefix: Path) -> None:
    """Claude Code's postinstall puts the native binary in place of a stub; npm set up to
    skip install scripts leaves the stub, so run the postinstall then."""
    claude = cli_path("claude", prefix)
    probe = subprocess.run([claude, "--version"], check=False, capture_output=True, timeout=60)
    if probe.returncode:
        package = prefix / "node_modules" / "@anthropic-ai" / "claude-code"
        subprocess.run(["node", "install.cjs"], cwd=package, check=True, capture_output=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cli_path(name: str, prefix: Path = PREFIX) -> Path:
    return prefix / "node_modules" / ".bin" / name


# --- running ------------------------------------------------------------------------------
def base_env(home: Path) -> dict[str, str]:
    """Nothing from the developer's shell: no real keys, no proxy, no config."""
    return {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "NO_PROXY": "127.0.0.1,localhost",
    }


def run_agent(
    command: list[str], env: dict[str, str], workdir: Path, timeout: float
) -> tuple[int, str, str]:
    """Runs `command` in its own process group, killed whole if it outlives `timeout`."""
    process = subprocess.Popen(
        command,
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the group this call created, nothing else
        stdout, stderr = process.communicate()
        stderr += f"\n[killed after {timeout} s]"
    return process.returncode, stdout, stderr


def claude_env(base_url: str, key: str, home: Path, auth: str = "token") -> dict[str, str]:
    """`auth`: "token" sends `Authorization: Bearer`, "api_key" sends `x-api-key`."""
    env = base_env(home)
    env["ANTHROPIC_BASE_URL"] = base_url
    env["ANTHROPIC_AUTH_TOKEN" if auth == "token" else "ANTHROPIC_API_KEY"] = key
    env.update(
        DISABLE_TELEMETRY="1",
        DISABLE_ERROR_REPORTING="1",
        DISABLE_AUTOUPDATER="1",
        # No quota probes, titles, feature flags or update checks: only the model calls.
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
    )
    return env


def run_claude(
    cli: Path,
    base_url: str,
    key: str,
    workdir: Path,
    home: Path,
    *,
    task: str = TASK,
    model: str = CLAUDE_MODEL,
    auth: str = "token",
    timeout: float = RUN_TIMEOUT,
) -> AgentRun:
    """`claude -p` against `base_url` (the server root, as ANTHROPIC_BASE_URL: no /v1).

    `--allowedTools Bash,Read` lets it run them without a prompt: the simpler
    `--dangerously-skip-permissions` is refused when running as root (CI containers).
    """
    command = [str(cli), "-p", task, "--output-format", "json", "--model", model]
    command += ["--allowedTools", "Bash,Read"]
    env = claude_env(base_url, key, home, auth)
    code, stdout, stderr = run_agent(command, env, workdir, timeout)
    return AgentRun(code, stdout, stderr, workdir, claude_final_text(stdout))


def claude_final_text(stdout: str) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(stdout).get("result") or "")
    return ""


def codex_config(base_url: str, model: str = CODEX_MODEL) -> str:
    """A config.toml whose only provider is `base_url` + /v1, speaking Responses."""
    return f"""\
model = "{model}"
model_provider = "under_test"
check_for_update_on_startup = false

[analytics]
enabled = false

[features]
# Plugins sync a catalogue from github.com at start: the only non-loopback traffic.
plugins = false

[model_providers.under_test]
name = "under test"
base_url = "{base_url.rstrip("/")}/v1"
env_key = "{CODEX_KEY_VARIABLE}"
wire_api = "responses"
"""


def run_codex(
    cli: Path,
    base_url: str,
    key: str,
    workdir: Path,
    home: Path,
    *,
    task: str = TASK,
    model: str = CODEX_MODEL,
    timeout: float = RUN_TIMEOUT,
) -> AgentRun:
    """`codex exec` against `base_url` (the server root; the provider gets `/v1` appended)."""
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    (codex_home / "config.toml").write_text(codex_config(base_url, model))
    env = base_env(home)
    env.update(CODEX_HOME=str(codex_home), **{CODEX_KEY_VARIABLE: key})
    command = [str(cli), "exec", "--json", "--skip-git-repo-check"]
    # No sandbox (bubblewrap needs namespaces CI may lack) and no approvals: a test box.
    command += ["--dangerously-bypass-approvals-and-sandbox", "--cd", str(workdir), task]
    code, stdout, stderr = run_agent(command, env, workdir, timeout)
    return AgentRun(code, stdout, stderr, workdir, codex_final_text(stdout))


def codex_final_text(stdout: str) -> str:
    """The last `agent_message` among `codex exec --json`'s events (one JSON per line)."""
    final = ""
    for line in stdout.splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            item = json.loads(line).get("item") or {}
            if item.get("type") == "agent_message":
                final = str(item.get("text") or "")
    return final
