"""SIGTERM under real gunicorn: streams in flight finish, then the master exits 0.

This is what Kubernetes (after the preStop pause) and `docker stop` do to the gateway.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from dataclasses import dataclass, field

import pytest
import requests

from tests.e2e.conftest import Gateway, GatewayFactory
from tests.fake_upstream import expected_stream

pytestmark = pytest.mark.e2e


@dataclass
class StreamInFlight:
    """A slow streamed completion read in a background thread."""

    gateway: Gateway
    headers: dict[str, str]
    chunks: int
    delay: float
    body: bytearray = field(default_factory=bytearray)
    status: int | None = None
    error: BaseException | None = None
    first_bytes: threading.Event = field(default_factory=threading.Event)
    finished_at: float | None = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        assert self.first_bytes.wait(10), "the stream never started"

    def _read(self) -> None:
        payload = {
            "model": "m",
            "stream": True,
            "fake": {"chunks": self.chunks, "delay": self.delay},
        }
        try:
            with requests.post(
                self.gateway.url + "/v1/chat/completions",
                json=payload,
                headers=self.headers,
                stream=True,
                timeout=30,
            ) as response:
                self.status = response.status_code
                for piece in response.iter_content(chunk_size=None):
                    self.body += piece
                    self.first_bytes.set()
        except BaseException as error:
            self.error = error
        finally:
            self.finished_at = time.monotonic()
            self.first_bytes.set()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not finish"
        assert self.error is None, repr(self.error)


def port_of(gateway: Gateway) -> int:
    return int(gateway.url.rsplit(":", 1)[1])


def ready_until_draining(session: requests.Session, gateway: Gateway) -> requests.Response:
    """Ask /ready on one kept-alive connection until the worker has seen SIGTERM.

    gunicorn's gthread worker still answers requests on kept-alive connections for 2 s
    after SIGTERM; new connections are refused (see the next test).
    """
    deadline = time.monotonic() + 1.5
    while True:
        response = session.get(gateway.url + "/ready", timeout=2)
        if response.status_code != 200 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_sigterm_drains_a_stream_and_exits_zero(
    start_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = start_gateway()
    session = requests.Session()
    # Opens the kept-alive connection the drain check below reuses.
    assert session.get(gateway.url + "/ready", timeout=5).status_code == 200
    stream = StreamInFlight(gateway, auth, chunks=8, delay=0.4)

    signalled_at = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)

    ready = ready_until_draining(session, gateway)
    assert ready.status_code == 503, ready.text
    assert ready.json()["checks"]["shutdown"] == "draining"
    assert stream.finished_at is None, "the stream ended before the drain was observed"

    stream.join(timeout=20)
    assert stream.status == 200
    assert bytes(stream.body) == expected_stream(8)
    assert stream.finished_at is not None and stream.finished_at > signalled_at
    assert gateway.process.wait(20) == 0, gateway.logs()


def test_sigterm_refuses_new_connections_while_draining(
    start_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = start_gateway()
    stream = StreamInFlight(gateway, auth, chunks=12, delay=0.4)
    gateway.process.send_signal(signal.SIGTERM)

    refused = False
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline and not refused:
        try:
            with socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=0.5):
                pass
            time.sleep(0.1)
        except ConnectionRefusedError:
            refused = True
    # Refused while the stream still runs: a client fails over at once instead of waiting.
    still_streaming = stream.finished_at is None
    stream.join(timeout=20)
    assert bytes(stream.body) == expected_stream(12)
    assert gateway.process.wait(20) == 0
    assert refused and still_streaming
