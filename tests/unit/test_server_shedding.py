"""The worker's pieces for issue #18 that need no running server: which heads are scrapes,
the scrape thread's bound, answers written on the poller, and the shed counter."""

from __future__ import annotations

import selectors
import socket
import threading
import time
from concurrent import futures
from types import SimpleNamespace

import orjson
import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import error_body
from gateway.server.heads import is_inline_probe, is_metrics_scrape
from gateway.server.scrapes import MAX_SCRAPES, ScrapeThread, scrape_busy_reply
from gateway.server.sending import Sending
from gateway.server.shedding import (
    QUEUE_TIMEOUT,
    REASONS,
    SCRAPE_BUSY,
    SLOW_CLIENT,
    shed_counter,
)
from gateway.server.worker import GatewayThreadWorker


@pytest.mark.parametrize(
    ("head", "scrape"),
    [
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer k\r\n\r\n", True),
        (b"GET /metrics?name[]=x HTTP/1.0\r\n\r\n", True),
        (b"GET /health HTTP/1.1\r\n\r\n", False),
        (b"GET /metricsx HTTP/1.1\r\n\r\n", False),
        (b"HEAD /metrics HTTP/1.1\r\n\r\n", False),
        (b"POST /metrics HTTP/1.1\r\n\r\n", False),
        (b"GET /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", False),
        (b"GET /metrics HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n", False),
        (b"GET /metrics HTTP/1.1\r\nHost: a\r\n", False),  # incomplete
    ],
)
def test_only_bodiless_gets_of_metrics_are_scrapes(head: bytes, scrape: bool) -> None:
    assert is_metrics_scrape(head) is scrape
    assert not (scrape and is_inline_probe(head))


def test_the_scrape_thread_is_one_thread_of_its_own_and_bounded() -> None:
    scrapes = ScrapeThread()
    release = threading.Event()
    ran_on: list[str] = []
    done: list[futures.Future[object]] = []

    def render() -> None:
        ran_on.append(threading.current_thread().name)
        release.wait(10)

    try:
        for _ in range(MAX_SCRAPES):
            assert not scrapes.full()
            scrapes.submit(render, done.append)
        assert scrapes.full()  # one rendering, the others waiting: the next one is refused
        scrapes.ended()
        assert not scrapes.full()
        release.set()
        deadline = time.monotonic() + 10
        while len(done) < MAX_SCRAPES and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(done) == MAX_SCRAPES
        assert len(set(ran_on)) == 1 and ran_on[0].startswith("scrape")
    finally:
        release.set()
        scrapes.shutdown()


def test_a_refused_scrape_is_a_503_to_retry() -> None:
    head, _, body = scrape_busy_reply().partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert {"Connection: close", "Retry-After: 1"} <= set(lines)
    error = orjson.loads(body)
    assert error == error_body(503, error["error"]["message"])
    assert "/metrics" in error["error"]["message"]


class _Outcome:
    def __init__(self) -> None:
        self.sent: list[bool] = []
        self.stalled = 0

    def stall(self) -> None:
        self.stalled += 1


def _pump(poller: selectors.BaseSelector, until: float) -> None:
    for key, _ in poller.select(max(0.0, until - time.monotonic())):
        key.data(key.fileobj)


def test_a_small_answer_is_sent_at_once() -> None:
    ours, theirs = socket.socketpair()
    outcome = _Outcome()
    with selectors.DefaultSelector() as poller, ours, theirs:
        ours.setblocking(False)
        Sending(poller, 5, outcome.stall).send(
            ours, b"HTTP/1.1 200 OK\r\n\r\n", outcome.sent.append
        )
        assert outcome.sent == [True]
        assert poller.get_map() == {}  # nothing left waiting on the poller
        assert theirs.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"


def test_a_large_answer_is_written_as_the_client_reads_it() -> None:
    ours, theirs = socket.socketpair()
    data = bytes(range(256)) * 32768  # 8 MiB: many socket buffers
    received = bytearray()

    def read() -> None:
        theirs.settimeout(10)
        while len(received) < len(data) and (piece := theirs.recv(65536)):
            received.extend(piece)
            time.sleep(0.001)  # a client slower than the writer

    outcome = _Outcome()
    reader = threading.Thread(target=read, daemon=True)
    with selectors.DefaultSelector() as poller, ours, theirs:
        ours.setblocking(False)
        sending = Sending(poller, 30, outcome.stall)
        sending.send(ours, data, outcome.sent.append)
        assert outcome.sent == []  # it did not fit: the rest waits on the poller
        reader.start()
        deadline = time.monotonic() + 30
        while not outcome.sent and time.monotonic() < deadline:
            _pump(poller, time.monotonic() + 0.5)
            sending.expire(time.monotonic())
        reader.join(10)
    assert outcome.sent == [True] and outcome.stalled == 0
    assert bytes(received) == data
    assert sending.next_deadline() is None


def test_a_client_that_does_not_read_is_dropped_at_the_deadline() -> None:
    ours, theirs = socket.socketpair()
    outcome = _Outcome()
    with selectors.DefaultSelector() as poller, ours, theirs:
        ours.setblocking(False)
        sending = Sending(poller, 5, outcome.stall)
        sending.send(ours, b"x" * (8 << 20), outcome.sent.append)
        deadline = sending.next_deadline()
        assert deadline is not None
        sending.expire(deadline - 0.001)
        assert outcome.sent == []
        sending.expire(deadline)
        assert outcome.sent == [False] and outcome.stalled == 1
        assert poller.get_map() == {}


def test_a_client_gone_mid_answer_ends_the_answer() -> None:
    ours, theirs = socket.socketpair()
    outcome = _Outcome()
    with selectors.DefaultSelector() as poller, ours:
        ours.setblocking(False)
        sending = Sending(poller, 30, outcome.stall)
        sending.send(ours, b"x" * (8 << 20), outcome.sent.append)
        theirs.close()
        deadline = time.monotonic() + 10
        while not outcome.sent and time.monotonic() < deadline:
            _pump(poller, time.monotonic() + 0.5)
        assert outcome.sent == [False] and outcome.stalled == 0


def _shed_samples(client: FlaskClient) -> dict[str, float]:
    text = client.get("/metrics").get_data(as_text=True)
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "gateway_shed_requests_total"
    }


def test_the_shed_counter_starts_every_reason_at_zero_and_counts(
    app: Flask, client: FlaskClient
) -> None:
    assert _shed_samples(client) == {}  # no worker yet: no series
    count = shed_counter(app)
    assert _shed_samples(client) == dict.fromkeys(REASONS, 0.0)
    count(QUEUE_TIMEOUT)
    count(QUEUE_TIMEOUT)
    count(SLOW_CLIENT)
    assert _shed_samples(client) == {
        **dict.fromkeys(REASONS, 0.0),
        QUEUE_TIMEOUT: 2.0,
        SLOW_CLIENT: 1.0,
    }


def test_an_app_without_metrics_counts_nothing() -> None:
    count = shed_counter(object())
    count(QUEUE_TIMEOUT)  # a no-op, not an error


class _FullWorker:
    """What `GatewayThreadWorker._scrape` uses of its worker, with the scrape thread full."""

    def __init__(self) -> None:
        self.scrapes = type("Full", (), {"full": lambda _self: True})()
        self.shed: list[str] = []
        self.finished: list[bool] = []

    def count_shed(self, reason: str, count: int = 1) -> None:
        self.shed.append(reason)

    def _finish(self, conn: object, *, keep_alive: bool) -> None:
        self.finished.append(keep_alive)


def test_a_scrape_beyond_the_bound_is_refused_counted_and_closed() -> None:
    from gateway.server.worker import GatewayThreadWorker

    ours, theirs = socket.socketpair()
    worker = _FullWorker()
    with ours, theirs:
        conn = type("Conn", (), {"sock": ours})()
        GatewayThreadWorker._scrape(worker, conn)  # a stand-in for the worker
        assert theirs.recv(65536).startswith(b"HTTP/1.1 503")
    assert worker.shed == [SCRAPE_BUSY]
    assert worker.finished == [False]


class _Accepting:
    """Just what GatewayThreadWorker.accept reads: how many connections one wake-up takes."""

    def __init__(self, workers: int, backlog: int) -> None:
        self.cfg = SimpleNamespace(workers=workers)
        self.nr_conns = 0
        self.worker_connections = 1000
        self.backlog = backlog

    def _accept_one(self, _listener: object) -> bool:
        if not self.backlog:
            return False
        self.backlog -= 1
        self.nr_conns += 1
        return True


@pytest.mark.parametrize(("workers", "taken"), [(1, 64), (2, 1), (4, 1)])
def test_one_worker_drains_a_burst_and_shared_workers_take_one_connection_a_wake_up(
    workers: int, taken: int
) -> None:
    # With several workers on one socket, every worker wakes for the burst: the first to
    # run must not take all of a load balancer's keep-alive connections for itself.
    worker = _Accepting(workers, backlog=100)

    GatewayThreadWorker.accept(worker, None)  # type: ignore[arg-type]

    assert worker.nr_conns == taken
