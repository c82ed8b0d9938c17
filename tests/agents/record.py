"""Records what the real agents send, as JSON fixtures in `tests/agents/recorded/`.

    python -m tests.agents.record

runs Claude Code against the fake native Messages provider and Codex against the fake
native Responses provider (see `tests.fake_dialects`), each completing one tool task, and
writes one file per request received: `{"recorded_with", "note", "method", "path",
"headers", "body"}`, secrets replaced by `<redacted>`. Unit tests read them with `load`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from tests.agents import clis
from tests.fake_dialects import AgentScript, FakeDialects, Received

RECORDED = Path(__file__).resolve().parent / "recorded"
SECRET_HEADERS = {"authorization", "x-api-key", "cookie", "proxy-authorization"}
# The fixtures must stay small enough to read in a unit test and to review.
MAX_BYTES = 200_000
KEY = "sk-recording-key-0123456789"
NONCE = "gateway-ok-recorded"


def load(name: str) -> dict[str, Any]:
    """A recorded request: `load("claude_code_turn1")["body"]`."""
    return json.loads((RECORDED / f"{name}.json").read_text())  # type: ignore[no-any-return]


def redacted(headers: dict[str, str]) -> dict[str, str]:
    return {k: "<redacted>" if k in SECRET_HEADERS else v for k, v in headers.items()}


def fixture(received: Received, recorded_with: str, note: str) -> dict[str, Any]:
    return {
        "recorded_with": recorded_with,
        "note": note,
        "method": received.method,
        "path": received.path,
        "headers": redacted(received.headers),
        "body": received.json,
    }


def save(name: str, content: dict[str, Any]) -> Path:
    text = json.dumps(content, indent=1, ensure_ascii=False) + "\n"
    if len(text.encode()) > MAX_BYTES:
        raise ValueError(f"{name}: {len(text.encode())} bytes, more than {MAX_BYTES}")
    path = RECORDED / f"{name}.json"
    path.write_text(text)
    return path


def record_run(
    prefix: str, requests: list[Received], recorded_with: str, task: str, turns: int
) -> None:
    """Saves the first `turns` POSTs (a variant needs only its first: the rest repeats)."""
    calls = [r for r in requests if r.method == "POST"]
    for turn, received in enumerate(calls[:turns], 1):
        note = f"{task}; POST {turn} of {len(calls)}, untrimmed"
        print(save(f"{prefix}_turn{turn}", fixture(received, recorded_with, note)))
    others = [f"{r.method} {r.path}" for r in requests if r.method != "POST"]
    if others:
        print(f"{prefix}: side requests {others}")


def record_claude(
    script: AgentScript,
    prefix: str,
    model: str = clis.CLAUDE_MODEL,
    auth: str = "token",
    turns: int = 1,
) -> None:
    with (
        FakeDialects(frozenset({"messages"}), script) as fake,
        tempfile.TemporaryDirectory() as tmp,
    ):
        work, home = Path(tmp, "work"), Path(tmp, "home")
        work.mkdir()
        home.mkdir()
        cli = clis.cli_path("claude")
        run = clis.run_claude(cli, fake.base_url, KEY, work, home, model=model, auth=auth)
        assert NONCE in run.final_text, run.explain()
        version = f"claude-code {clis.VERSIONS['@anthropic-ai/claude-code']}"
        task = f"claude -p --output-format json --model {model}, {auth} auth"
        record_run(prefix, fake.requests, version, task, turns)


def record_codex(script: AgentScript, prefix: str, model: str, turns: int = 1) -> None:
    with (
        FakeDialects(frozenset({"responses"}), script) as fake,
        tempfile.TemporaryDirectory() as tmp,
    ):
        work, home = Path(tmp, "work"), Path(tmp, "home")
        work.mkdir()
        home.mkdir()
        run = clis.run_codex(clis.cli_path("codex"), fake.base_url, KEY, work, home, model=model)
        assert NONCE in run.final_text, run.explain()
        version = f"codex {clis.VERSIONS['@openai/codex']}"
        record_run(prefix, fake.requests, version, f"codex exec --json, model {model}", turns)


def main() -> None:
    clis.install_agents()
    RECORDED.mkdir(exist_ok=True)
    script = AgentScript(f"echo {NONCE} > result.txt && cat result.txt", reasoning=True)
    record_claude(script, "claude_code", turns=2)
    record_claude(script, "claude_code_api_key", auth="api_key")
    record_claude(script, "claude_code_budget_thinking", model="claude-sonnet-4-5")
    # What a model name routed by a gateway alias looks like to each agent.
    record_claude(script, "claude_code_unknown_model", model="qwen3-coder-plus")
    record_codex(script, "codex", clis.CODEX_MODEL, turns=2)
    record_codex(script, "codex_unknown_model", "qwen3-coder-plus")


if __name__ == "__main__":
    main()
