"""What the provider connection writes: a small body goes out with the request's head."""

from __future__ import annotations

from collections.abc import Iterator

from gateway.upstream.connection import _WITH_HEAD_BYTES, _GatewayConnection


class _Recorder:
    """The connection's socket: every sendall() kept as one write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def settimeout(self, timeout: float | None) -> None:
        del timeout


def send(body: bytes | Iterator[bytes] | None, method: str = "POST") -> list[bytes]:
    connection = _GatewayConnection("127.0.0.1", 9)
    recorder = _Recorder()
    connection.sock = recorder
    connection.request(method, "/v1/chat/completions", body=body, headers={"X-A": "1"})
    return recorder.writes


def test_a_small_body_goes_out_with_its_head_in_one_write() -> None:
    body = b'{"model": "m", "messages": []}'
    (write,) = send(body)
    head, _, rest = write.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nContent-Length: %d" % len(body) in head
    assert rest == body


def test_a_large_body_follows_its_head_uncopied() -> None:
    body = b"x" * (_WITH_HEAD_BYTES + 1)
    head, rest = send(body)
    assert head.endswith(b"\r\n\r\n") and rest == body


def test_a_streamed_body_and_no_body_are_written_as_before() -> None:
    writes = send(iter([b"ab", b"cd"]))
    assert writes[0].endswith(b"\r\n\r\n") and b"Transfer-Encoding: chunked" in writes[0]
    assert writes[1:] == [b"2\r\nab\r\n", b"2\r\ncd\r\n", b"0\r\n\r\n"]
    (head,) = send(None, method="GET")
    assert head.startswith(b"GET ") and head.endswith(b"\r\n\r\n")
