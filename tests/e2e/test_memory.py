"""Memory stays bounded whatever the shape or size of a body, in either direction.

The Kubernetes manifest gives a pod 512 Mi. Peak RSS is sampled from /proc for the whole
gateway process tree (master and worker) while hostile bodies go through it.
"""

from __future__ import annotations

import os
import socket
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from bench.procs import PeakRss, process_tree, rss_bytes
from tests.constants import GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.raw_upstream import RawRequest, RawUpstream, json_answer

CHAT = "/v1/chat/completions"
AUTH = {"Authorization": f"Bearer {GATEWAY_KEY}", "Content-Type": "application/json"}
MB = 1024 * 1024
PEAK_LIMIT = 300 * MB  # the target
SETTLED_SLACK = 30 * MB


def tree_rss(pid: int) -> int:
    """RSS of `pid` and its children, in bytes (the bench's own sampler reads the same)."""
    return rss_bytes(process_tree(pid))


def tiny_objects_body(size: int) -> bytes:
    """A valid chat body of `size` bytes whose messages are millions of empty objects."""
    head, tail = b'{"model":"m","messages":[', b"]}"
    count = (size - len(head) - len(tail)) // 3
    return head + b",".join([b"{}"] * count) + tail


def gzip_bomb(decoded: int) -> bytes:
    """`decoded` bytes of zeros, gzip-compressed (about a thousandth of the size)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(MB)
    parts = [packer.compress(block) for _ in range(decoded // MB)]
    return b"".join([*parts, packer.flush()])


@pytest.fixture
def provider() -> Iterator[RawUpstream]:
    bomb = gzip_bomb(1024 * MB)

    def answer(request: RawRequest, conn: socket.socket) -> bool:
        # The answer is picked by the request's model (received() sends it).
        kind = request.body[len(b'{"model":"') :].partition(b'"')[0].decode()
        if kind == "m":  # the adversarial request bodies: a short answer
            conn.sendall(json_answer(b'{"ok": true}'))
        elif kind == "huge":  # 500 MB with a Content-Length
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            conn.sendall(head + b"Content-Length: %d\r\n\r\n" % (500 * MB))
            block = b"x" * MB
            for _ in range(500):
                conn.sendall(block)
        elif kind == "bomb":  # 1 MB of gzip that inflates to 1 GB
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            conn.sendall(head + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb))
            conn.sendall(bomb)
        else:  # "event": one 300 MB SSE event in a single HTTP chunk
            event = b"data: " + b"z" * (300 * MB) + b"\n\n"
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            conn.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % len(event))
            for at in range(0, len(event), MB):
                conn.sendall(event[at : at + MB])
            conn.sendall(b"\r\n0\r\n\r\n")
        return True

    upstream = RawUpstream(answer).start()
    yield upstream
    upstream.stop()


def received(gateway: Gateway, kind: str) -> tuple[int, int]:
    """Ask for the `kind` of answer, reading the body in pieces: (status, bytes received)."""
    size = 0
    body = b'{"model":"%s","stream":%s}' % (kind.encode(), b"true" if kind == "event" else b"false")
    with requests.post(
        gateway.url + CHAT, data=body, headers=AUTH, stream=True, timeout=120
    ) as response:
        try:
            for piece in response.iter_content(MB):
                size += len(piece)
        except requests.exceptions.ChunkedEncodingError:
            pass  # cut off by the gateway past MAX_RESPONSE_BODY_BYTES
        return response.status_code, size


def test_hostile_bodies_in_both_directions_keep_memory_bounded(
    start_gateway: GatewayFactory, provider: RawUpstream
) -> None:
    gateway = start_gateway(
        TARGET_API_URL=provider.url,
        MAX_RESPONSE_BODY_BYTES=str(600 * MB),
        GUNICORN_THREADS="16",
    )
    body = tiny_objects_body(9_900_000)
    post = lambda _: requests.post(gateway.url + CHAT, data=body, headers=AUTH, timeout=120)  # noqa: E731
    post(0)  # warm-up: threads started, pages touched once
    idle = tree_rss(gateway.process.pid)

    with PeakRss(gateway.process.pid, interval=0.02) as rss:
        with ThreadPoolExecutor(8) as pool:
            statuses = [r.status_code for r in pool.map(post, range(8))]
        huge = received(gateway, "huge")
        event = received(gateway, "event")

    assert statuses == [200] * 8
    assert huge == (200, 500 * MB)
    assert event == (200, 300 * MB + 8)
    assert rss.peak <= PEAK_LIMIT, f"peak {rss.peak / MB:.0f} MB"
    assert _settles(gateway, idle), (
        f"idle {idle / MB:.0f} MB, now {tree_rss(gateway.process.pid) / MB:.0f} MB"
    )
    print(f"idle {idle / MB:.0f} MB, peak {rss.peak / MB:.0f} MB")


def test_a_gzip_bomb_is_cut_at_the_cap_without_inflating_in_memory(
    start_gateway: GatewayFactory, provider: RawUpstream
) -> None:
    gateway = start_gateway(TARGET_API_URL=provider.url, MAX_RESPONSE_BODY_BYTES=str(64 * MB))
    received(gateway, "m")  # warm-up
    idle = tree_rss(gateway.process.pid)

    with PeakRss(gateway.process.pid, interval=0.02) as rss:
        status, size = received(gateway, "bomb")

    assert status == 200  # its status line had gone out with the first 256 KiB
    assert size <= 64 * MB  # then the connection was cut: never 1 GB
    assert rss.peak - idle <= 64 * MB, f"grew {(rss.peak - idle) / MB:.0f} MB"
    assert '"upstream_error":"too_large"' in gateway.logs()


def _settles(gateway: Gateway, idle: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if tree_rss(gateway.process.pid) <= idle + SETTLED_SLACK:
            return True
        time.sleep(0.2)
    return False


assert os.sep == "/"  # /proc is Linux's
