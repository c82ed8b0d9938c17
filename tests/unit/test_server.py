"""The worker's pieces that need no running server: heads, replies, thread start-up,
stack size, lingering closes, and the capacity settings."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent import futures

import orjson
import pytest
from gunicorn.config import Config
from gunicorn.http.errors import LimitRequestHeaders
from gunicorn.http.parser import RequestParser

from gateway.config import ConfigError, load_settings
from gateway.errors import error_body
from gateway.server.heads import Head, head_state, is_inline_probe, max_head_bytes
from gateway.server.lingering import Lingering
from gateway.server.replies import error_reply
from gateway.server.threads import THREAD_STACK_BYTES, start_every_thread
from tests.constants import GATEWAY_KEY, UPSTREAM_KEY

REQUIRED = {"ENV_FILE": "", "TARGET_API_KEY": UPSTREAM_KEY, "GATEWAY_API_KEYS": GATEWAY_KEY}


def gunicorn_parses(head: bytes, cfg: Config) -> bool:
    """Whether gunicorn's own parser accepts `head` (fed in small pieces, as from a socket)."""
    pieces = [head[i : i + 4096] for i in range(0, len(head), 4096)]
    try:
        next(RequestParser(cfg, pieces, ("127.0.0.1", 1)))
    except LimitRequestHeaders:
        return False
    return True


@pytest.mark.parametrize(
    ("buffered", "state"),
    [
        (b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n", Head.COMPLETE),
        (b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n{partial body", Head.COMPLETE),
        (b"GET /health HTTP/1.1\n\n", Head.COMPLETE),  # bare LF: gunicorn rejects it at once
        (b"GET /health HTTP/1.1\r\nHost: a\r\n", Head.INCOMPLETE),
        (b"", Head.INCOMPLETE),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * 101, Head.TOO_LARGE),
    ],
)
def test_head_state(buffered: bytes, state: Head) -> None:
    assert head_state(buffered, max_bytes=100) is state


@pytest.mark.parametrize(
    ("fields", "field_size"), [(100, 8190), (10, 100), (0, 0)], ids=["default", "small", "zero"]
)
def test_the_largest_head_gunicorn_accepts_fits_the_bound(fields: int, field_size: int) -> None:
    cfg = Config()
    cfg.set("limit_request_fields", fields)
    cfg.set("limit_request_field_size", field_size)
    size = field_size or 8190  # gunicorn's meaning of 0
    count = min(fields or 32768, 100) - 1  # cheap, and past any small bound
    header = b"X-Big: " + b"a" * (size - len(b"X-Big: ") - 2) + b"\r\n"  # exactly `size`
    line = b"GET /" + b"p" * (cfg.limit_request_line - len(b"GET / HTTP/1.1")) + b" HTTP/1.1\r\n"
    largest = line + header * count + b"\r\n"
    assert gunicorn_parses(largest, cfg)
    assert len(largest) <= max_head_bytes(cfg)


@pytest.mark.parametrize(
    ("head", "inline"),
    [
        (b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"GET /ready?full=1 HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"GET /ready HTTP/1.0\r\n\r\n", True),
        (b"GET /metrics HTTP/1.1\r\n\r\n", False),
        (b"GET /healthz HTTP/1.1\r\n\r\n", False),
        (b"POST /health HTTP/1.1\r\n\r\n", False),
        (b"GET /health HTTP/1.1\r\ncontent-LENGTH: 3\r\n\r\nabc", False),
        (b"GET /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", False),
        (b"GET /health HTTP/1.1\r\nHost: a\r\n", False),  # incomplete
    ],
)
def test_only_bodiless_probes_are_answered_inline(head: bytes, inline: bool) -> None:
    assert is_inline_probe(head) is inline


def test_error_reply_is_openai_json_that_closes_the_connection() -> None:
    reply = error_reply(503, "Service Unavailable", "busy", [("Retry-After", "1")])
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert {"Connection: close", "Content-Type: application/json", "Retry-After: 1"} <= set(lines)
    assert f"Content-Length: {len(body)}" in lines
    assert orjson.loads(body) == error_body(503, "busy")


def test_every_pool_thread_starts_at_once() -> None:
    # Counted by name: other tests' timer threads may end meanwhile (active_count() would
    # then be off by one).
    def pool_threads() -> int:
        return sum(t.name.startswith("started-at-once") for t in threading.enumerate())

    pool = futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="started-at-once")
    try:
        start_every_thread(pool, 8)
        assert pool_threads() == 8
        # Work submitted later starts no thread: all are there, idle.
        pool.submit(lambda: None).result(timeout=10)
        assert pool_threads() == 8
    finally:
        pool.shutdown(wait=True)


def test_runaway_recursion_in_a_request_thread_is_an_error_not_a_crash() -> None:
    # In a subprocess: a stack too small for Python's recursion limit would segfault it.
    script = textwrap.dedent(
        f"""
        import threading
        threading.stack_size({THREAD_STACK_BYTES})

        class Deep:  # recursion through a C slot uses the C stack at every level
            def __getattr__(self, name):
                return getattr(self, name + "x")

        def run():
            try:
                Deep().a
            except RecursionError:
                print("RecursionError")

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == b"RecursionError"


def test_lingering_close_sends_eof_and_closes_once_the_peer_does() -> None:
    ours, theirs = socket.socketpair()
    theirs.settimeout(10)
    with selectors.DefaultSelector() as poller:
        lingering = Lingering(poller)
        lingering.close(ours)
        assert theirs.recv(1) == b""  # our FIN arrived; we still read what they send
        assert ours.fileno() != -1
        theirs.sendall(b"late bytes")
        theirs.close()
        deadline = time.monotonic() + 10
        while ours.fileno() != -1 and time.monotonic() < deadline:
            for key, _ in poller.select(0.5):
                key.data(key.fileobj)
        assert ours.fileno() == -1
        assert lingering.next_deadline() is None


def test_lingering_close_gives_up_at_its_deadline() -> None:
    ours, theirs = socket.socketpair()
    with selectors.DefaultSelector() as poller:
        lingering = Lingering(poller)
        lingering.close(ours)
        deadline = lingering.next_deadline()
        assert deadline is not None
        lingering.expire(deadline - 0.001)
        assert ours.fileno() != -1
        lingering.expire(deadline)
        assert ours.fileno() == -1
    theirs.close()


def test_capacity_settings_defaults_and_parsing() -> None:
    defaults = load_settings(REQUIRED)
    assert defaults.client_header_timeout == 10.0
    assert defaults.client_write_timeout == 60.0
    assert defaults.queue_timeout == 5.0
    chosen = load_settings(
        {
            **REQUIRED,
            "CLIENT_HEADER_TIMEOUT": "2.5",
            "CLIENT_WRITE_TIMEOUT": "30",
            "QUEUE_TIMEOUT": "0.5",
        }
    )
    assert chosen.client_header_timeout == 2.5
    assert chosen.client_write_timeout == 30.0
    assert chosen.queue_timeout == 0.5


@pytest.mark.parametrize(
    "variable", ["CLIENT_HEADER_TIMEOUT", "CLIENT_WRITE_TIMEOUT", "QUEUE_TIMEOUT"]
)
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_capacity_settings_refuse_what_is_not_a_timeout(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings({**REQUIRED, variable: value})
    assert variable in raised.value.message


class _Arbiter:
    """What Handover uses of gunicorn's arbiter."""

    WORKER_BOOT_ERROR = 3

    def __init__(self, workers: set[int]) -> None:
        self.WORKERS = dict.fromkeys(workers)
        self.num_workers = len(workers)
        self.managed = 0
        self.killed: list[tuple[int, int]] = []
        self.woken = False

    def manage_workers(self) -> None:
        self.managed += 1

    def kill_worker(self, pid: int, sig: int) -> None:
        self.killed.append((pid, sig))

    def wakeup(self) -> None:
        self.woken = True


def test_a_reload_whose_new_worker_cannot_boot_keeps_the_old_one_and_rolls_back() -> None:
    from gateway.server.handover import BootReports, Handover

    server, reports = _Arbiter({100}), BootReports()
    handover = Handover.install(server, reports)
    rolled_back: list[bool] = []
    handover.begin(roll_back=lambda: rolled_back.append(True))
    server.WORKERS[200] = None  # the reload's new worker, booting: the old one stays
    server.manage_workers()
    assert server.managed == 0 and handover.pending

    os.write(reports.write_fd, b"200 failed RuntimeError: can't start new thread\n")
    server.manage_workers()
    assert rolled_back == [True] and server.managed == 0
    assert server.killed == [(200, signal.SIGTERM)]
    del server.WORKERS[200]  # reaped
    server.manage_workers()
    assert not handover.pending and server.managed == 1 and set(server.WORKERS) == {100}


def test_a_reload_hands_over_once_every_new_worker_is_ready() -> None:
    from gateway.server.handover import BootReports, Handover

    server, reports = _Arbiter({100}), BootReports()
    handover = Handover.install(server, reports)
    handover.begin(roll_back=lambda: None)
    server.WORKERS[os.getpid()] = None
    server.manage_workers()
    assert server.managed == 0
    reports.send("ready")  # from the new worker (this process stands in for it)
    deadline = time.monotonic() + 5
    while not server.woken:  # the report wakes the master's loop, not its next second
        assert time.monotonic() < deadline
        time.sleep(0.01)
    server.manage_workers()
    assert not handover.pending and server.managed == 1  # gunicorn now stops the old one
