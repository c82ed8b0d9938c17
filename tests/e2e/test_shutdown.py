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


def test_sigterm_drains_a_stream_and_exits_zero(
    start_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = start_gateway()
    # An idle kept-alive connection, and one whose probe is on its way when SIGTERM comes.
    idle = socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=5)
    idle.sendall(b"GET /ready HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 200")
    probing = socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=5)
    probing.sendall(b"GET /ready HTTP/1.1\r\n")
    stream = StreamInFlight(gateway, auth, chunks=8, delay=0.4)

    signalled_at = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)

    # The drain serves no new request: the idle connection is closed at once...
    assert idle.recv(65536) == b"", "an idle kept-alive connection was kept while draining"
    # ... and a probe finishing its head meanwhile learns why, on a closing connection.
    probing.sendall(b"Host: gw\r\n\r\n")
    ready = probing.recv(65536)
    assert ready.startswith(b"HTTP/1.1 503") and b'"draining"' in ready, ready
    assert b"connection: close" in ready.lower()
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
