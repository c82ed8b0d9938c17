"""A provider that misbehaves, under real gunicorn: what reaches the client, and what not."""

from __future__ import annotations

import gzip
import socket
import time
from collections.abc import Iterator

import orjson
import pytest
import requests

from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY, UPSTREAM_KEY
from tests.e2e.conftest import GatewayFactory
from tests.raw_upstream import RawRequest, RawUpstream, json_answer

CHAT = "/v1/chat/completions"


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    """Each test sets `raw_upstream.answer`; stopped at teardown."""
    upstream = RawUpstream(lambda request, conn: False).start()
    yield upstream
    upstream.stop()


def ask(url: str, key: str, marker: str, **extra: object) -> requests.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": marker}], **extra}
    return requests.post(
        url + CHAT, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


def marker_of(request: RawRequest) -> str:
    return orjson.loads(request.body)["messages"][0]["content"]


def test_an_early_hint_never_hands_one_callers_answer_to_the_next(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    # The provider sends 103 Early Hints (and 102 Processing), then the real answer a
    # moment later, on a keep-alive connection. http.client took the 1xx for the answer
    # and left the 200 on the pooled connection for the next caller, from any key.
    def answer(request: RawRequest, conn: socket.socket) -> bool:
        marker = marker_of(request)
        conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        conn.sendall(b"HTTP/1.1 102 Processing\r\n\r\n")
        time.sleep(0.5)
        conn.sendall(json_answer(orjson.dumps({"answer_for": marker})))
        return True

    raw_upstream.answer = answer
    gateway = start_gateway(TARGET_API_URL=raw_upstream.url)

    first = ask(gateway.url, GATEWAY_KEY, "alice")
    second = ask(gateway.url, SECOND_GATEWAY_KEY, "bob")

    assert (first.status_code, first.json()) == (200, {"answer_for": "alice"})
    assert (second.status_code, second.json()) == (200, {"answer_for": "bob"})
    assert "Link" not in first.headers  # a hint for the provider's page, not ours
    # The connection was kept and reused: the fix reads past the hints, it does not
    # merely throw connections away.
    assert raw_upstream.requests[0].connection == raw_upstream.requests[1].connection


@pytest.mark.parametrize(
    "status_line", [b"HTTP/1.1 101 Switching Protocols", b"HTTP/1.1 700 Invented"]
)
def test_a_status_no_final_answer_can_have_is_a_502_and_the_connection_is_dropped(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, status_line: bytes
) -> None:
    def answer(request: RawRequest, conn: socket.socket) -> bool:
        if marker_of(request) == "first":
            conn.sendall(status_line + b"\r\nUpgrade: h2c\r\n\r\n")
            conn.sendall(json_answer(b'{"leftover": true}'))
            return True
        conn.sendall(json_answer(orjson.dumps({"answer_for": marker_of(request)})))
        return True

    raw_upstream.answer = answer
    gateway = start_gateway(TARGET_API_URL=raw_upstream.url)

    first = ask(gateway.url, GATEWAY_KEY, "first")
    second = ask(gateway.url, SECOND_GATEWAY_KEY, "second")

    assert first.status_code == 502
    assert set(first.json()["error"]) == {"message", "type", "param", "code"}
    assert second.json() == {"answer_for": "second"}  # never the leftover
    assert raw_upstream.requests[0].connection != raw_upstream.requests[1].connection


def test_the_provider_key_echoed_back_is_masked_everywhere(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    echoed = f"Bearer {UPSTREAM_KEY}"

    def answer(request: RawRequest, conn: socket.socket) -> bool:
        assert request.headers["authorization"] == echoed
        kind = marker_of(request)
        if kind == "error":  # an error body relayed as it is (a 401 is the gateway's 502)
            body = orjson.dumps({"error": {"message": f"Bad request {echoed}", "code": 400}})
            conn.sendall(json_answer(body, "400 Bad Request", f"X-Debug-Auth: {echoed}\r\n"))
        elif kind == "stream":
            # The key split across two SSE chunks, then whole in a third.
            half = len(UPSTREAM_KEY) // 2
            parts = [
                b'data: {"k": "' + UPSTREAM_KEY[:half].encode(),
                UPSTREAM_KEY[half:].encode() + b'"}\n\n',
                b'data: {"again": "' + UPSTREAM_KEY.encode() + b'"}\n\n',
                b"data: [DONE]\n\n",
            ]
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
                + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
                + b"0\r\n\r\n"
            )
        else:  # a long JSON answer, relayed as it arrives, the key JSON-escaped at the end
            filler = b"x" * (600 * 1024)
            body = b'{"filler": "' + filler + b'", "k": "' + UPSTREAM_KEY.encode() + b'"}'
            conn.sendall(json_answer(body))
        return True

    raw_upstream.answer = answer
    gateway = start_gateway(TARGET_API_URL=raw_upstream.url)
    secret = UPSTREAM_KEY.encode()

    error = ask(gateway.url, GATEWAY_KEY, "error")
    stream = ask(gateway.url, GATEWAY_KEY, "stream", stream=True)
    long = ask(gateway.url, GATEWAY_KEY, "long")

    for response in (error, stream, long):
        seen = response.content + str(response.headers).encode()
        assert secret not in seen
        assert secret[-4:] in seen  # masked as sk-...abcd, so the operator can tell which key
    assert error.status_code == 400
    assert "sk-..." in error.json()["error"]["message"]
    assert stream.content.count(b"sk-...") == 2
    assert len(long.json()["filler"]) == 600 * 1024


def test_headers_for_the_providers_own_origin_are_not_relayed(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    own_origin = (
        "Strict-Transport-Security: max-age=63072000; includeSubDomains\r\n"
        'WWW-Authenticate: Bearer realm="provider"\r\n'
        "Location: https://provider.example/elsewhere\r\n"
        'Alt-Svc: h3=":443"\r\n'
        'Clear-Site-Data: "*"\r\n'
        "X-Provider-Info: kept\r\n"
    )

    def answer(request: RawRequest, conn: socket.socket) -> bool:
        conn.sendall(json_answer(b'{"ok": true}', extra=own_origin))
        return True

    raw_upstream.answer = answer
    gateway = start_gateway(TARGET_API_URL=raw_upstream.url)

    response = ask(gateway.url, GATEWAY_KEY, "hi")

    assert response.status_code == 200
    for name in ("Strict-Transport-Security", "WWW-Authenticate", "Location", "Alt-Svc"):
        assert name not in response.headers
    assert "Clear-Site-Data" not in response.headers
    assert response.headers["X-Provider-Info"] == "kept"


def test_an_answer_dripped_byte_by_byte_meets_the_overall_deadline(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    body = b'{"answer": "' + b"y" * 200 + b'"}'

    def answer(request: RawRequest, conn: socket.socket) -> bool:
        conn.sendall(json_answer(body)[: -len(body)])
        for byte in body:  # one byte every 0.1 s: the read timeout (5 s) never fires
            if raw_upstream.wait_closed(conn, 0.1):
                return False
            conn.sendall(bytes([byte]))
        return False

    raw_upstream.answer = answer
    gateway = start_gateway(
        TARGET_API_URL=raw_upstream.url, UPSTREAM_READ_TIMEOUT="5", UPSTREAM_TOTAL_TIMEOUT="1.5"
    )

    started = time.monotonic()
    response = ask(gateway.url, GATEWAY_KEY, "slow")
    took = time.monotonic() - started

    assert response.status_code == 504
    assert "1.5 s" in response.json()["error"]["message"]
    assert took < 15  # the 20 s drip was cut (bound generous for a loaded machine)
    deadline = time.monotonic() + 10
    while not raw_upstream.closed_at and time.monotonic() < deadline:
        time.sleep(0.05)
    assert raw_upstream.closed_at  # the provider saw the gateway hang up


def _chunked(body: bytes, content_type: str = "application/json") -> bytes:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head.encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


KEEP_ALIVE_ANSWERS = {
    "json": lambda: json_answer(b'{"ok":1}'),
    "gzip": lambda: json_answer(gzip.compress(b'{"ok":1}'), extra="Content-Encoding: gzip\r\n"),
    "chunked": lambda: _chunked(b'{"ok":1}'),
    "sse": lambda: _chunked(b"data: {}\n\ndata: [DONE]\n\n", "text/event-stream"),
    "long": lambda: json_answer(b'{"x":"' + b"a" * (400 * 1024) + b'"}'),
    "error": lambda: json_answer(b'{"error":{}}', status="400 Bad Request"),
    "no-content": lambda: b"HTTP/1.1 204 No Content\r\n\r\n",
}


@pytest.mark.parametrize("kind", list(KEEP_ALIVE_ANSWERS))
def test_every_kind_of_complete_answer_keeps_the_provider_connection(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, kind: str
) -> None:
    # The relay reads bodies in pieces now: reading one to its end must still hand the
    # connection back to the pool (a new TCP and TLS handshake per call otherwise).
    def answer(request: RawRequest, conn: socket.socket) -> bool:
        conn.sendall(KEEP_ALIVE_ANSWERS[kind]())
        return True

    raw_upstream.answer = answer
    gateway = start_gateway(TARGET_API_URL=raw_upstream.url, GUNICORN_THREADS="4")

    # One client connection: each call starts only after the previous one was released
    # (separate connections could overlap a release and open a second upstream connection).
    with requests.Session() as session:
        body = {"model": "m", "messages": []}
        headers = {"Authorization": f"Bearer {GATEWAY_KEY}"}
        statuses = [
            session.post(gateway.url + CHAT, json=body, headers=headers, timeout=30).status_code
            for _ in range(3)
        ]

    assert set(statuses) <= {200, 204, 400}
    assert len({request.connection for request in raw_upstream.requests}) == 1


def test_a_long_answer_cut_for_an_http10_client_ends_in_a_reset(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    # HTTP/1.0 answers of unknown length end when the connection closes: a clean close
    # after the provider died would read as a complete (truncated) body.
    def answer(request: RawRequest, conn: socket.socket) -> bool:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        conn.sendall(head + b"Content-Length: 1000000\r\n\r\n" + b"b" * 400_000)
        return False  # and the provider dies mid-answer

    raw_upstream.answer = answer
    gateway = start_gateway(TARGET_API_URL=raw_upstream.url)
    body = b'{"model":"m"}'
    request = (
        b"POST /v1/chat/completions HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer "
        + GATEWAY_KEY.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    port = int(gateway.url.rsplit(":", 1)[1])
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        with pytest.raises(ConnectionResetError):
            while chunk := conn.recv(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.0 200") or received == b""
