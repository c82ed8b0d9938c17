"""The image without a container engine: its files, its CMD and its HEALTHCHECK, for real.

The files the Dockerfile copies (from the context .dockerignore leaves) are laid out in a
temporary folder and the image's CMD is started there, with the image's environment. A
module missing from the image, a secret that would be baked in, or a health check that
cannot tell a healthy gateway from a dead one fails here.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import ClassVar

import pytest
import requests

from tests.deploy.conftest import REPO, SECRETS
from tests.deploy.parsers import (
    Instruction,
    build_context,
    copy_sources,
    dockerignore_rules,
    env_assignments,
    final_stage,
    healthcheck_command,
)
from tests.e2e.conftest import START_COMMAND, free_port

BIN = Path(sys.executable).parent


def lay_out_image(root: Path, dockerfile: list[Instruction]) -> Path:
    """Copy what each COPY of the final stage copies; return the WORKDIR."""
    context = set(build_context(REPO, dockerignore_rules((REPO / ".dockerignore").read_text())))
    workdir = PurePosixPath("/")
    for instruction in final_stage(dockerfile):
        if instruction.keyword == "WORKDIR":
            workdir = workdir / instruction.arguments
        if instruction.keyword != "COPY":
            continue
        sources, dest = copy_sources(instruction.arguments)
        target = root / (workdir / dest).relative_to("/")
        into_folder = dest.endswith("/") or dest in (".", "./") or len(sources) > 1
        for source in (s.rstrip("/") for s in sources):
            files = sorted(p for p in context if p == source or p.startswith(source + "/"))
            assert files, f"COPY {source}: not in the build context"
            for path in files:
                if path == source:
                    out = target / Path(path).name if into_folder else target
                else:
                    out = target / path.removeprefix(source + "/")
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(REPO / path, out)
    return root / workdir.relative_to("/")


def image_env(dockerfile: list[Instruction], **overrides: str) -> dict[str, str]:
    """The image's ENV, this virtualenv's executables, no home, and what `docker run` adds."""
    env = {"PATH": f"{BIN}{os.pathsep}/usr/bin:/bin", "HOME": "/nonexistent"}
    for instruction in final_stage(dockerfile):
        if instruction.keyword == "ENV":
            env.update(env_assignments(instruction.arguments))
    env.update(overrides)
    return env


def healthcheck(dockerfile: list[Instruction], port: int) -> int:
    check = next(i for i in final_stage(dockerfile) if i.keyword == "HEALTHCHECK")
    command = healthcheck_command(check.arguments)
    result = subprocess.run(
        command,
        env=image_env(dockerfile, PORT=str(port)),
        capture_output=True,
        timeout=15,
        check=False,
    )
    return result.returncode


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*")}


@pytest.mark.e2e
def test_image_cmd_serves_and_its_healthcheck_sees_it(
    tmp_path: Path, dockerfile: list[Instruction]
) -> None:
    app_dir = lay_out_image(tmp_path / "image", dockerfile)
    assert not (app_dir / "tests").exists() and not (app_dir / ".env").exists()
    before = snapshot(app_dir)
    port = free_port()
    env = image_env(dockerfile, **SECRETS, PORT=str(port), TARGET_API_URL="http://127.0.0.1:9/v1")
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            START_COMMAND, cwd=app_dir, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                    break
            # Timeout: accepted by the listening socket while the worker still boots.
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.05)
        assert process.poll() is None, log_path.read_text(errors="replace")
        assert healthcheck(dockerfile, port) == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert healthcheck(dockerfile, port) != 0
    # The container's root filesystem is read-only: nothing may be written beside the code.
    assert snapshot(app_dir) == before


class _Answer(BaseHTTPRequestHandler):
    status = 200
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server(request: pytest.FixtureRequest) -> Iterator[tuple[int, list[str]]]:
    handler = type("Handler", (_Answer,), {"status": request.param, "paths": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], handler.paths
    server.shutdown()
    server.server_close()
    thread.join(10)


@pytest.mark.parametrize(
    ("health_server", "healthy"), [(200, True), (503, False)], indirect=["health_server"]
)
def test_healthcheck_follows_the_health_status(
    dockerfile: list[Instruction], health_server: tuple[int, list[str]], healthy: bool
) -> None:
    port, paths = health_server
    assert (healthcheck(dockerfile, port) == 0) is healthy
    assert paths == ["/health"]
