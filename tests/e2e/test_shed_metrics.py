"""The load the gateway sheds, counted (issue #18), and /metrics answered while every request
thread is busy, under real gunicorn.

Thread counts are tiny (1-2) so that "every thread is busy" is cheap to arrange, as in
test_capacity.py, whose helpers these tests share.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families

from gateway.server.shedding import REASONS
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.e2e.test_capacity import (
    LONG_STREAM,
    busy_threads,
    chat_wire,
    connect,
    drip,
    nothing_received,
    port_of,
    read_until_closed,
)
from tests.e2e.test_streaming import disconnects_of
from tests.fake_upstream import FakeUpstream
from tests.monitoring.conftest import METRICS_KEY

pytestmark = pytest.mark.e2e

SCRAPE = {"Authorization": f"Bearer {METRICS_KEY}"}
SHED = "gateway_shed_requests_total"
NOTHING_SHED = dict.fromkeys(REASONS, 0.0)
PARTIAL_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"


def shed(gateway: Gateway) -> dict[str, float]:
    """gateway_shed_requests_total by reason, from one scrape."""
    scraped = requests.get(gateway.url + "/metrics", headers=SCRAPE, timeout=10)
    assert scraped.status_code == 200, scraped.text
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(scraped.text)
        for sample in family.samples
        if sample.name == SHED
    }


def shed_soon(gateway: Gateway, reason: str, count: float) -> dict[str, float]:
    """The scrape that first shows `count` for `reason` (bounded: 10 s), or the last one.

    The worker counts a drop just after the client or provider can notice it."""
    deadline = time.monotonic() + 10
    counts = shed(gateway)
    while counts.get(reason) != count and time.monotonic() < deadline:
        time.sleep(0.1)
        counts = shed(gateway)
    return counts


def test_metrics_answer_while_every_request_thread_streams_and_requests_queue(
    start_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = start_gateway(GUNICORN_THREADS="2", QUEUE_TIMEOUT="60", METRICS_KEY=METRICS_KEY)
    with busy_threads(gateway, auth, 2):
        queued = [connect(gateway) for _ in range(2)]
        for sock in queued:
            sock.sendall(chat_wire({"model": "m", "stream": True, "fake": LONG_STREAM}))
        try:
            with requests.Session() as scraper:  # kept alive between scrapes, as Prometheus does
                for _ in range(3):
                    started = time.monotonic()
                    scraped = scraper.get(gateway.url + "/metrics", headers=SCRAPE, timeout=10)
                    elapsed = time.monotonic() - started
                    assert scraped.status_code == 200, scraped.text
                    # Generous: a scrape queued behind these streams would wait ~20 s.
                    assert elapsed < 2, f"/metrics took {elapsed:.2f} s"
                    # Rendered now, by the app: the two streams holding the threads are open.
                    assert "gateway_streams_in_flight 2.0" in scraped.text
            started = time.monotonic()
            anonymous = requests.get(gateway.url + "/metrics", timeout=10)
            assert anonymous.status_code == 401  # METRICS_KEY still applies
            assert time.monotonic() - started < 2
            # The pool really was full: the extra streams are still waiting for a thread.
            assert all(nothing_received(sock) for sock in queued)
        finally:
            for sock in queued:
                sock.close()


def test_requests_refused_for_want_of_a_thread_are_counted(
    start_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = start_gateway(GUNICORN_THREADS="2", QUEUE_TIMEOUT="1", METRICS_KEY=METRICS_KEY)
    # Every reason is there from the start, at 0: a rate is 0, not "no data".
    assert shed(gateway) == NOTHING_SHED

    def chat(_: int) -> int:
        url = gateway.url + "/v1/chat/completions"
        return requests.post(url, json={"model": "m"}, headers=auth, timeout=30).status_code

    with busy_threads(gateway, auth, 2), ThreadPoolExecutor(max_workers=3) as pool:
        statuses = list(pool.map(chat, range(3)))
        while_busy = shed(gateway)
    assert statuses == [503, 503, 503]
    assert while_busy == {**NOTHING_SHED, "queue_timeout": 3.0}


def test_heads_that_do_not_arrive_in_time_or_are_too_large_are_counted(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(CLIENT_HEADER_TIMEOUT="1", METRICS_KEY=METRICS_KEY)
    idle, partial, dripper = (connect(gateway) for _ in range(3))
    partial.sendall(PARTIAL_HEAD)
    dripper.sendall(PARTIAL_HEAD + b"X-Slow: ")
    stop = threading.Event()
    dripping = threading.Thread(target=drip, args=([dripper], stop, b"a"), daemon=True)
    dripping.start()
    try:
        assert read_until_closed(idle) == b""  # nothing sent: closed, not answered, not counted
        for sock in (partial, dripper):
            assert read_until_closed(sock).startswith(b"HTTP/1.1 408")
    finally:
        stop.set()
        dripping.join(5)
        for sock in (idle, partial, dripper):
            sock.close()

    # More than gunicorn's parser would ever read for one head (~800 KiB by default).
    with connect(gateway) as huge, contextlib.suppress(OSError):
        huge.sendall(b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"a" * (1024 * 1024))
        read_until_closed(huge)
    counts = shed_soon(gateway, "header_too_large", 1.0)
    assert counts == {**NOTHING_SHED, "header_timeout": 2.0, "header_too_large": 1.0}


def test_a_stream_client_that_stops_reading_is_counted(
    start_gateway: GatewayFactory, fake_upstream: FakeUpstream
) -> None:
    gateway = start_gateway(
        GUNICORN_THREADS="1", CLIENT_WRITE_TIMEOUT="2", QUEUE_TIMEOUT="60", METRICS_KEY=METRICS_KEY
    )
    request_id = uuid.uuid4().hex
    stalled = socket.socket()
    # A small receive window: the gateway's writes block after a few hundred KiB at most.
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.settimeout(10)
    stalled.connect(("127.0.0.1", port_of(gateway)))
    try:
        script = {"chunks": 50000, "delay": 0}  # ~7 MB of stream that it never reads
        stalled.sendall(chat_wire({"model": "m", "stream": True, "fake": script}, request_id))
        assert disconnects_of(fake_upstream, request_id), "the provider connection stayed open"
        counts = shed_soon(gateway, "slow_client", 1.0)
    finally:
        stalled.close()
    assert counts == {**NOTHING_SHED, "slow_client": 1.0}


def test_a_request_reaching_a_draining_worker_is_counted_and_scrapes_still_answer(
    start_gateway: GatewayFactory,
) -> None:
    gateway = start_gateway(METRICS_KEY=METRICS_KEY)
    # Heads begun before SIGTERM are still read during the drain (for 2 s at most).
    request, scrape = connect(gateway), connect(gateway)
    try:
        request.sendall(b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n")
        scrape.sendall(b"GET /metrics HTTP/1.1\r\nHost: gateway\r\n")
        time.sleep(0.2)  # both heads begun: the drain keeps them
        gateway.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while '"draining: ' not in gateway.logs() and time.monotonic() < deadline:
            time.sleep(0.02)
        request.sendall(b"\r\n")
        assert read_until_closed(request).startswith(b"HTTP/1.1 503")
        scrape.sendall(f"Authorization: Bearer {METRICS_KEY}\r\n\r\n".encode())
        head, _, body = read_until_closed(scrape).partition(b"\r\n\r\n")
    finally:
        request.close()
        scrape.close()
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head
    samples = {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == SHED
    }
    assert samples == {**NOTHING_SHED, "draining": 1.0}
    assert gateway.process.wait(20) == 0


def shed_by_worker(directory: Path, reason: str) -> dict[str, float]:
    """Each worker's own count for `reason`, read from its multiprocess file."""
    counts = {}
    for path in directory.glob("counter_*.db"):
        for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            _, sample, labels, _ = json.loads(key)
            if sample == SHED and labels == {"reason": reason}:
                counts[path.stem.removeprefix("counter_")] = value
    return counts


def test_two_workers_report_the_sum_of_what_each_shed(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    shared = tmp_path / "multiproc"
    shared.mkdir()
    gateway = start_gateway(
        GUNICORN_WORKERS="2",
        PROMETHEUS_MULTIPROC_DIR=str(shared),
        RATE_LIMIT_REQUESTS_PER_MINUTE="0",
        CLIENT_HEADER_TIMEOUT="1",
        METRICS_KEY=METRICS_KEY,
    )
    answered_408 = 0
    # Batches of half-sent heads on new connections, until both workers have had some
    # (the kernel hands each connection to whichever worker accepts first): bounded, 8.
    for _ in range(8):
        batch = []
        for _ in range(6):
            batch.append(connect(gateway))
            batch[-1].sendall(PARTIAL_HEAD)
            time.sleep(0.05)
        for sock in batch:
            answered_408 += read_until_closed(sock).startswith(b"HTTP/1.1 408")
            sock.close()
        by_worker = shed_by_worker(shared, "header_timeout")
        if len([n for n in by_worker.values() if n > 0]) >= 2:
            break
    assert len([n for n in by_worker.values() if n > 0]) >= 2, by_worker
    assert sum(by_worker.values()) == answered_408

    # Whichever worker answers a scrape (new connections), it reports both workers' sum.
    scrapes = [shed(gateway) for _ in range(6)]
    assert scrapes == [{**NOTHING_SHED, "header_timeout": float(answered_408)}] * 6
