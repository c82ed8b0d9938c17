"""Clients that leave, queue and give up, or send broken bodies, under real gunicorn."""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest
import requests

from tests.constants import GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.raw_upstream import RawRequest, RawUpstream, json_answer

CHAT = "/v1/chat/completions"
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}"}


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    upstream = RawUpstream(lambda request, conn: False).start()
    yield upstream
    upstream.stop()


def body_for(marker: str, stream: bool = False) -> dict[str, object]:
    return {"model": "m", "stream": stream, "messages": [{"role": "user", "content": marker}]}


def marker_of(request: RawRequest) -> str:
    return orjson.loads(request.body)["messages"][0]["content"]


def wait_for(condition: object, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_before_the_answer_stops_the_providers_work(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, stream: bool
) -> None:
    # The provider thinks for 30 s before its headers (a reasoning model, non-streamed, or
    # a stream before its first byte). The client gives up after 1 s.
    def answer(request: RawRequest, conn: socket.socket) -> bool:
        if not raw_upstream.wait_closed(conn, 30):
            conn.sendall(json_answer(b'{"late": true}'))
        return False

    raw_upstream.answer = answer
    gateway = start_gateway(TARGET_API_URL=raw_upstream.url)

    with pytest.raises(requests.Timeout):
        requests.post(gateway.url + CHAT, json=body_for("x", stream), headers=AUTH, timeout=1)
    left = time.monotonic()

    assert wait_for(lambda: raw_upstream.closed_at, 15)
    assert raw_upstream.closed_at[0] - left < 10  # seconds, not the 30 s (or 600 s) it had
    assert wait_for(lambda: '"status":499' in gateway.logs())
    assert '"client_disconnected":true' in gateway.logs()


def test_queued_requests_whose_clients_gave_up_never_reach_the_provider(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    def answer(request: RawRequest, conn: socket.socket) -> bool:
        if marker_of(request) == "hold":
            time.sleep(3)  # the only thread is busy with this one meanwhile
        conn.sendall(json_answer(b'{"ok": true}'))
        return True

    raw_upstream.answer = answer
    # A long QUEUE_TIMEOUT: the three must still be queued (not refused) when "hold" ends.
    gateway = start_gateway(
        TARGET_API_URL=raw_upstream.url, GUNICORN_THREADS="1", QUEUE_TIMEOUT="60"
    )

    def post(marker: str, timeout: float) -> int | str:
        try:
            url = gateway.url + CHAT
            return requests.post(
                url, json=body_for(marker), headers=AUTH, timeout=timeout
            ).status_code
        except requests.Timeout:
            return "gave up"

    with ThreadPoolExecutor(4) as pool:
        held = pool.submit(post, "hold", 30)
        time.sleep(0.5)  # "hold" has the thread; these three queue behind it
        impatient = [pool.submit(post, f"impatient-{i}", 0.5) for i in range(3)]
        assert [f.result() for f in impatient] == ["gave up"] * 3
        assert held.result() == 200

    assert wait_for(lambda: gateway.logs().count('"status":499') == 3)
    assert [marker_of(r) for r in raw_upstream.requests] == ["hold"]
    # And the gateway still serves.
    assert post("after", 10) == 200


def raw_exchange(gateway: Gateway, data: bytes, half_close: bool = False) -> bytes:
    """Send bytes as they are on one connection; read the answer until the server closes."""
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(data)
        if half_close:
            conn.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    return received


def request_head(extra: str) -> bytes:
    return (
        f"POST {CHAT} HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
        f"Authorization: Bearer {GATEWAY_KEY}\r\nContent-Type: application/json\r\n{extra}\r\n"
    ).encode()


BODY = orjson.dumps(body_for("x"))


@pytest.mark.parametrize(
    "framing",
    [
        b"zz\r\n" + BODY + b"\r\n0\r\n\r\n",  # a chunk size that is not hex
        b"%x\r\n" % len(BODY) + BODY + b"XX0\r\n\r\n",  # a chunk without its CRLF
    ],
    ids=["bad-size", "missing-terminator"],
)
def test_malformed_chunked_bodies_are_a_400_and_never_sent_upstream(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream, framing: bytes
) -> None:
    gateway = start_gateway(TARGET_API_URL=raw_upstream.url)

    answer = raw_exchange(gateway, request_head("Transfer-Encoding: chunked\r\n") + framing)

    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 400 "), answer[:300]
    error = orjson.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert raw_upstream.requests == []
    assert "Traceback" not in gateway.logs()


def test_a_body_shorter_than_its_content_length_is_a_400_and_never_sent_upstream(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    gateway = start_gateway(TARGET_API_URL=raw_upstream.url)
    declared = f"Content-Length: {len(BODY) + 40}\r\n"

    answer = raw_exchange(gateway, request_head(declared) + BODY, half_close=True)

    assert answer.startswith(b"HTTP/1.1 400 "), answer[:300]
    assert b'"incomplete_body"' in answer
    assert raw_upstream.requests == []


def test_one_connection_serves_on_after_bodies_read_whole_and_bodies_left_unread(
    gateway: Gateway,
) -> None:
    # A refused key leaves its body unread (gthread drains it before the next request);
    # an answered one was read whole (nothing to drain). Either way the connection serves
    # the next request, and the bytes of one body are never taken for the next request.
    host = gateway.url.removeprefix("http://")
    connection = http.client.HTTPConnection(host, timeout=10)
    body = orjson.dumps(body_for("y" * 20_000))
    headers = {"Content-Type": "application/json"}
    statuses: list[int] = []
    for key in ("wrong-key", GATEWAY_KEY, "wrong-key", GATEWAY_KEY):
        connection.request("POST", CHAT, body, headers | {"Authorization": f"Bearer {key}"})
        if not statuses:
            first_socket = connection.sock
        answer = connection.getresponse()
        answer.read()
        statuses.append(answer.status)
        assert connection.sock is first_socket, "the gateway closed the connection"
    connection.close()
    assert statuses == [401, 200, 401, 200]


def test_a_kept_alive_client_that_leaves_during_its_next_request_stops_the_providers_work(
    start_gateway: GatewayFactory, raw_upstream: RawUpstream
) -> None:
    # The connection's socket stays watched between requests: the second request on it is
    # watched without registering again, and its client leaving must still end the
    # provider's work (30 s of thinking), as for a first request.
    def answer(request: RawRequest, conn: socket.socket) -> bool:
        if marker_of(request) == "slow" and not raw_upstream.wait_closed(conn, 30):
            conn.sendall(json_answer(b'{"late": true}'))
        elif marker_of(request) != "slow":
            conn.sendall(json_answer(b'{"ok": true}'))
        return marker_of(request) != "slow"

    raw_upstream.answer = answer
    gateway = start_gateway(TARGET_API_URL=raw_upstream.url)
    connection = http.client.HTTPConnection(gateway.url.removeprefix("http://"), timeout=10)
    headers = {"Content-Type": "application/json"} | AUTH
    connection.request("POST", CHAT, orjson.dumps(body_for("fast")), headers)
    first = connection.getresponse()
    assert (first.status, first.read()) == (200, b'{"ok": true}')
    kept = connection.sock

    connection.request("POST", CHAT, orjson.dumps(body_for("slow")), headers)
    assert connection.sock is kept, "the second request did not reuse the connection"
    assert wait_for(lambda: len(raw_upstream.requests) == 2)
    connection.close()
    left = time.monotonic()

    assert wait_for(lambda: raw_upstream.closed_at, 15)
    assert raw_upstream.closed_at[0] - left < 10  # seconds, not the provider's 30
    assert wait_for(lambda: '"status":499' in gateway.logs())
