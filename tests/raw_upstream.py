"""A provider that misbehaves on purpose: each test writes its answers byte for byte.

`RawUpstream(answer)` listens on loopback; for every request it reads the head and the
Content-Length body, records them, and calls `answer(request, conn)`, which writes
whatever it likes to the real socket and returns True to keep the connection for the next
request. It also records when the gateway closed a connection while an answer was pending
(`closed_at`), so tests can prove the provider's work was cut.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class RawRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int  # which accepted connection it came on: equal means reused


Answer = Callable[[RawRequest, socket.socket], bool]


@dataclass
class RawUpstream:
    answer: Answer
    requests: list[RawRequest] = field(default_factory=list)
    closed_at: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self._listener.getsockname()[1]
        self._connections = 0
        self._open: list[socket.socket] = []
        self._stopped = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> RawUpstream:
        threading.Thread(target=self._accept, name="raw-upstream", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for conn in self._open:
            with contextlib.suppress(OSError):
                conn.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._connections += 1
            self._open.append(conn)
            threading.Thread(
                target=self._serve, args=(conn, self._connections), daemon=True
            ).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        reader = conn.makefile("rb")
        with contextlib.suppress(OSError, ValueError):
            while (request := _read_request(reader, number)) is not None:
                self.requests.append(request)
                if not self.answer(request, conn):
                    break
        with contextlib.suppress(OSError):
            conn.close()

    def wait_closed(self, conn: socket.socket, seconds: float) -> bool:
        """In an answer: wait up to `seconds` for the gateway to close; record when it did."""
        conn.settimeout(seconds)
        try:
            gone = conn.recv(1) == b""
        except TimeoutError:
            return False
        except OSError:
            gone = True
        if gone:
            self.closed_at.append(time.monotonic())
        return gone


def _read_request(reader: object, number: int) -> RawRequest | None:
    line = reader.readline()  # type: ignore[attr-defined]
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while (header := reader.readline()) not in (b"\r\n", b"\n", b""):  # type: ignore[attr-defined]
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = reader.read(length) if length else b""  # type: ignore[attr-defined]
    return RawRequest(method, path, headers, body, number)


def json_answer(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    """A complete keep-alive JSON answer, as bytes."""
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body
