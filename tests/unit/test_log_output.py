"""Where JSON log lines go: at once, or through one writer thread in a worker (log_output.py).

Waits here are bounded liveness waits (a line that never arrives fails the test after
seconds), never a speed requirement.
"""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from loguru import logger

from gateway import logs
from gateway.config import Settings
from gateway.log_output import LineOutput

WAIT = 10.0  # seconds: how long a line may take to show up before the test fails


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "the lines never reached the stream"
        time.sleep(0.005)


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_without_a_writer_thread_each_line_is_written_and_flushed_at_once() -> None:
    stream = CountingStream()
    output = LineOutput(stream)

    for n in range(5):
        output.write(f"line {n}\n")
        assert stream.getvalue().splitlines() == [f"line {i}" for i in range(n + 1)]
        assert stream.flushes == n + 1
    output.write("urgent\n", urgent=True)
    output.flush()  # nothing queued: nothing more
    assert stream.getvalue().endswith("line 4\nurgent\n")
    assert stream.flushes == 6


def test_background_lines_reach_the_stream_in_order() -> None:
    stream = io.StringIO()
    output = LineOutput(stream)
    output.start_background()
    expected = [f"line {n}" for n in range(1000)]

    for line in expected:
        output.write(line + "\n")

    _wait_for(lambda: stream.getvalue().count("\n") == len(expected))
    assert stream.getvalue().splitlines() == expected


def test_starting_the_background_twice_starts_one_writer() -> None:
    output = LineOutput(io.StringIO())

    def writers() -> int:
        return sum(1 for t in threading.enumerate() if t.name == "log-writer")

    before = writers()
    output.start_background()
    output.start_background()

    assert writers() == before + 1


def test_eight_threads_writing_at_once_get_whole_lines_each_in_its_order() -> None:
    # A pipe: real write() calls, read by a thread of its own as a terminal or a collector is.
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w", encoding="utf-8")
    output = LineOutput(stream)
    output.start_background()
    received = bytearray()

    def read_all() -> None:
        while chunk := os.read(read_end, 1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    barrier = threading.Barrier(8)
    padding = "x" * 100  # lines of ~120 bytes: 8,000 of them are many pipe buffers

    def write_lines(thread: int) -> None:
        barrier.wait()
        for n in range(1000):
            output.write(f"{thread} {n} {padding}\n")

    threads = [threading.Thread(target=write_lines, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    _wait_for(lambda: received.count(b"\n") >= 8000)
    stream.close()
    reader.join(WAIT)
    os.close(read_end)

    lines = received.decode().splitlines()
    assert len(lines) == 8000
    whole = re.compile(rf"([0-7]) (\d+) {padding}")
    seen: dict[int, list[int]] = {t: [] for t in range(8)}
    for line in lines:
        match = whole.fullmatch(line)
        assert match, f"a broken or interleaved line: {line!r}"
        seen[int(match[1])].append(int(match[2]))
    assert all(numbers == list(range(1000)) for numbers in seen.values())


def test_flush_writes_everything_queued() -> None:
    stream = io.StringIO()
    output = LineOutput(stream)
    output.start_background()
    lines = [f"line {n}\n" for n in range(2000)]

    for line in lines:
        output.write(line)
    output.flush()

    # Flushed lines are in the stream by the time flush returns; the writer thread may be
    # writing the last of them meanwhile (it holds the same lock), never losing or reordering.
    assert stream.getvalue() == "".join(lines)


def test_an_urgent_line_is_written_before_write_returns_after_all_queued_before_it() -> None:
    stream = io.StringIO()
    output = LineOutput(stream)
    output.start_background()
    before = [f"info {n}\n" for n in range(500)]

    for line in before:
        output.write(line)
    output.write("warning\n", urgent=True)

    assert stream.getvalue() == "".join(before) + "warning\n"


class HeldWakeUp(threading.Event):
    """The writer thread's wake-up, whose wait() can be held just after it returns: the
    moment a thread switch can come between the writer waking and taking its lock."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.woken = threading.Event()
        self.go_on = threading.Event()
        self.hold = True

    def wait(self, timeout: float | None = None) -> bool:
        self.entered.set()
        result = super().wait(timeout)
        if self.hold:
            self.hold = False
            self.woken.set()
            self.go_on.wait(WAIT)
        return result


@pytest.fixture
def held_writer() -> Iterator[tuple[LineOutput, io.StringIO]]:
    """A background output whose writer thread has been woken for the line "first" and has
    not yet written it (as when the GIL passes to another thread at that instant)."""
    stream = io.StringIO()
    output = LineOutput(stream)
    output.start_background()
    first_wake_up = output._pending
    held = output._pending = HeldWakeUp()
    first_wake_up.set()  # the writer goes round once, then waits on `held`
    assert held.entered.wait(WAIT)
    output.write("first\n")
    assert held.woken.wait(WAIT)
    yield output, stream
    held.go_on.set()


def test_an_urgent_line_waits_for_a_line_the_writer_thread_has_taken(
    held_writer: tuple[LineOutput, io.StringIO],
) -> None:
    output, stream = held_writer

    output.write("warning\n", urgent=True)

    # "first" was queued before the warning: both are out, in that order, once write returns.
    assert stream.getvalue() == "first\nwarning\n"


def test_flush_waits_for_a_line_the_writer_thread_has_taken(
    held_writer: tuple[LineOutput, io.StringIO],
) -> None:
    # logs.flush() runs at exit and just before the drain's os._exit(): a line the writer
    # thread holds then is lost if flush returns without it.
    output, stream = held_writer
    output.write("second\n")

    output.flush()

    assert stream.getvalue() == "first\nsecond\n"


def test_a_closed_stream_is_no_error_for_the_writer_thread() -> None:
    stream = io.StringIO()
    output = LineOutput(stream)
    output.start_background()
    output.write("before\n")
    _wait_for(lambda: stream.getvalue() == "before\n")
    stream.close()

    output.write("after\n")
    output.flush()  # nothing raised: stdout gone, nothing left to tell
    output.write("urgent after\n", urgent=True)


class BlockedStream(io.StringIO):
    """A stdout that does not take lines until `release` is set (a full pipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.writing = threading.Event()

    def write(self, text: str) -> int:
        self.writing.set()
        assert self.release.wait(WAIT), "the test never released the stream"
        return super().write(text)


def test_when_stdout_blocks_the_queue_stops_growing_and_writers_wait() -> None:
    stream = BlockedStream()
    output = LineOutput(stream, max_queued=100)
    output.start_background()
    output.write("first\n")
    assert stream.writing.wait(WAIT)  # the writer thread is stuck in write()
    done = threading.Event()

    def many() -> None:
        for n in range(300):
            output.write(f"line {n}\n")
        done.set()

    writer = threading.Thread(target=many)
    writer.start()
    # The thread that adds line 101 flushes the queue itself and so waits for the stream.
    _wait_for(lambda: output._lines is not None and len(output._lines) > 100)
    assert not done.wait(0.2)
    assert output._lines is not None and len(output._lines) == 101

    stream.release.set()
    writer.join(WAIT)
    assert done.is_set()
    output.flush()
    assert stream.getvalue().splitlines() == ["first"] + [f"line {n}" for n in range(300)]


# --- through gateway.logs: loguru's JSON sink ----------------------------------------------


@pytest.fixture
def json_logs(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """configure_logging on a stdout of the test's own; loguru is global: configured again
    on the real stdout afterwards, as every app the other tests build does."""
    stream = io.StringIO()
    with monkeypatch.context() as patch:
        patch.setattr("sys.stdout", stream)
        logs.configure_logging(settings)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logs.configure_logging(settings)


def test_the_json_sink_writes_at_once_until_a_worker_starts_its_writer(
    json_logs: Callable[[], list[dict[str, Any]]],
) -> None:
    logger.info("at once")

    assert [(line["level"], line["message"]) for line in json_logs()] == [("info", "at once")]


def test_the_json_sink_through_the_writer_thread(
    json_logs: Callable[[], list[dict[str, Any]]],
) -> None:
    logs.write_in_background()
    for n in range(200):
        logger.info("info {}", n)
    _wait_for(lambda: len(json_logs()) == 200)

    logger.warning("a warning")  # nothing queued before it: out before warning() returns
    written = json_logs()

    assert [line["message"] for line in written] == [f"info {n}" for n in range(200)] + [
        "a warning"
    ]
    assert [line["level"] for line in written] == ["info"] * 200 + ["warning"]
    logger.info("last")
    logs.flush()
    assert json_logs()[-1]["message"] == "last"


def test_configuring_again_ends_the_background_writing(
    settings: Settings,
    json_logs: Callable[[], list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    logs.write_in_background()
    stream = io.StringIO()
    with monkeypatch.context() as patch:
        patch.setattr("sys.stdout", stream)
        logs.configure_logging(settings)  # what the fixture's teardown relies on
    logger.info("synchronous again")

    assert json.loads(stream.getvalue())["message"] == "synchronous again"
