"""The disconnect watcher, on real socket pairs: client EOF and deadlines."""

from __future__ import annotations

import socket
import threading
import time

from gateway.disconnects import CLIENT_GONE, DEADLINE, SHUTDOWN, DisconnectWatcher


class Ended:
    """Records the reasons a watch ended with, and lets a test wait for one."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.event = threading.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.event.set()


def _watcher_has_run(watcher: DisconnectWatcher) -> None:
    # A fresh pair closed at once: once it is reported, the watcher has handled the events
    # that came before it.
    probe, probe_peer = socket.socketpair()
    ended = Ended()
    with probe:
        watcher.watch(probe, ended)
        probe_peer.close()
        assert ended.event.wait(10)


def test_closing_the_peer_calls_back() -> None:
    watcher = DisconnectWatcher()
    server, client = socket.socketpair()
    ended = Ended()
    with server:
        watcher.watch(server, ended)
        client.close()
        assert ended.event.wait(10)
    assert ended.reasons == [CLIENT_GONE]
    watcher.close()


def test_a_client_already_gone_is_reported_before_watch_returns() -> None:
    # A request that queued while its client gave up must not be sent upstream at all.
    watcher = DisconnectWatcher()
    server, client = socket.socketpair()
    client.close()
    ended = Ended()
    with server:
        watcher.watch(server, ended)
        assert ended.reasons == [CLIENT_GONE]  # synchronously, on this thread
    watcher.close()


def test_no_call_back_after_unwatch_or_while_the_peer_stays() -> None:
    watcher = DisconnectWatcher()
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    called: list[str] = []
    with first, second, second_peer:
        unwatch = watcher.watch(first, lambda reason: called.append("first"))
        watcher.watch(second, lambda reason: called.append("second"))
        unwatch()
        first_peer.close()
        _watcher_has_run(watcher)  # past the close above
        # Read before leaving the block, which closes second_peer (a real disconnect).
        assert called == []
    watcher.close()


def test_data_from_the_client_is_not_a_disconnect() -> None:
    watcher = DisconnectWatcher()
    server, client = socket.socketpair()
    called: list[str] = []
    with server, client:
        watcher.watch(server, called.append)
        client.sendall(b"GET / HTTP/1.1\r\n")
        _watcher_has_run(watcher)  # past the bytes above
        # Asked before the client closes: the watch goes on (see the next test).
        assert called == []
    watcher.close()


def test_a_client_gone_after_sending_more_than_its_request_is_a_disconnect() -> None:
    # Issue 19 item 5: the request, one more byte, then a close. Unread, that byte made the
    # socket readable with data, and the client was taken for alive (its provider stream
    # ran on for nobody).
    watcher = DisconnectWatcher()
    server, client = socket.socketpair()
    ended = Ended()
    with server:
        watcher.watch(server, ended)
        client.sendall(b"x")
        time.sleep(0.2)  # the watcher sees the byte first, the client still there
        assert ended.reasons == []
        client.close()
        assert ended.event.wait(10), "the client's close behind an unread byte went unseen"
    assert ended.reasons == [CLIENT_GONE]
    watcher.close()


def test_a_client_gone_behind_an_unread_byte_before_the_watch_is_reported_at_once() -> None:
    watcher = DisconnectWatcher()
    server, client = socket.socketpair()
    client.sendall(b"x")
    client.close()
    ended = Ended()
    with server:
        watcher.watch(server, ended)
        assert ended.reasons == [CLIENT_GONE]  # synchronously, on this thread
    watcher.close()


def test_end_all_ends_every_watched_exchange_for_the_shutdown() -> None:
    # A draining worker's last step before graceful_timeout: streams still open end now.
    watcher = DisconnectWatcher()
    server, client = socket.socketpair()
    with_client, without_client = Ended(), Ended()
    with server, client:
        watcher.watch(server, with_client, deadline=time.monotonic() + 600)
        watcher.watch(None, without_client, deadline=time.monotonic() + 600)
        unwatched = watcher.watch(None, Ended(), deadline=time.monotonic() + 600)
        unwatched()
        assert watcher.end_all() == 2
        # Not DEADLINE: the client would read "the upstream did not complete ...", and the
        # provider would be counted as failing.
        assert with_client.reasons == [SHUTDOWN] and without_client.reasons == [SHUTDOWN]
        assert watcher.end_all() == 0  # each once
    watcher.close()


def test_a_deadline_calls_back_once_without_a_client() -> None:
    watcher = DisconnectWatcher()
    ended = Ended()
    started = time.monotonic()
    watcher.watch(None, ended, deadline=started + 0.3)
    assert ended.event.wait(10)
    assert time.monotonic() - started >= 0.3
    time.sleep(0.6)  # a second tick must not call again
    assert ended.reasons == [DEADLINE]
    watcher.close()


def test_a_deadline_that_was_unwatched_never_fires() -> None:
    watcher = DisconnectWatcher()
    server, client = socket.socketpair()
    called: list[str] = []
    with server, client:
        unwatch = watcher.watch(server, called.append, deadline=time.monotonic() + 0.2)
        unwatch()
        later = Ended()
        watcher.watch(None, later, deadline=time.monotonic() + 0.4)
        assert later.event.wait(10)
    assert called == []
    watcher.close()


def test_a_failing_callback_does_not_stop_the_watcher() -> None:
    watcher = DisconnectWatcher()

    def fail(reason: str) -> None:
        raise AttributeError(f"no shutdown here ({reason})")

    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    ended = Ended()
    with first, second:
        watcher.watch(first, fail)
        first_peer.close()
        watcher.watch(second, ended)
        second_peer.close()
        assert ended.event.wait(10)
    watcher.close()


def test_unwatched_deadlines_do_not_pile_up() -> None:
    # A non-streamed request's deadline is 15 minutes away when it is unwatched; one kept
    # per request until then would grow without bound under load.
    watcher = DisconnectWatcher()
    far = time.monotonic() + 900
    for _ in range(10_000):
        watcher.watch(None, lambda reason: None, deadline=far)()
    assert len(watcher._deadlines) < 200
    watcher.close()


def test_watching_a_socket_with_a_timeout_does_not_wait_for_it() -> None:
    # The worker gives client sockets a write timeout; Python then waits for readability
    # before any recv, MSG_DONTWAIT or not.
    watcher = DisconnectWatcher()
    server, client = socket.socketpair()
    server.settimeout(30)
    with server, client:
        started = time.monotonic()
        unwatch = watcher.watch(server, Ended())
        assert time.monotonic() - started < 5
        unwatch()
    watcher.close()


def test_the_next_request_on_a_connection_is_watched_too() -> None:
    # The socket stays registered between requests (keep-alive): the second watch must
    # still see the client leave, and the first must not be called for it.
    watcher = DisconnectWatcher()
    server, client = socket.socketpair()
    first, second = Ended(), Ended()
    with server:
        watcher.watch(server, first)()
        watcher.watch(server, second)
        client.close()
        assert second.event.wait(10)
    assert first.reasons == [] and second.reasons == [CLIENT_GONE]
    watcher.close()


def test_a_client_gone_between_two_requests_is_reported_before_the_next_watch_returns() -> None:
    watcher = DisconnectWatcher()
    server, client = socket.socketpair()
    first, second = Ended(), Ended()
    with server:
        watcher.watch(server, first)()
        client.close()
        _watcher_has_run(watcher)
        watcher.watch(server, second)
        assert second.reasons == [CLIENT_GONE]  # synchronously, on this thread
    assert first.reasons == []
    watcher.close()


def test_a_new_connection_on_a_reused_fd_is_watched() -> None:
    watcher = DisconnectWatcher()
    old, old_peer = socket.socketpair()
    watcher.watch(old, Ended())()
    fd = old.fileno()
    old.close()
    old_peer.close()
    pairs = [socket.socketpair() for _ in range(4)]  # one of them is likely to reuse fd
    reused = next((pair for pair in pairs if fd in (pair[0].fileno(), pair[1].fileno())), None)
    assert reused is not None, "the closed fd was not reused"
    server, client = reused if reused[0].fileno() == fd else reversed(reused)
    ended = Ended()
    watcher.watch(server, ended)
    client.close()
    assert ended.event.wait(10)
    assert ended.reasons == [CLIENT_GONE]
    for pair in pairs:
        for sock in pair:
            sock.close()
    watcher.close()


def test_an_event_that_comes_after_its_socket_was_closed_is_dropped_quietly() -> None:
    # Under load the watcher may handle an event polled just before gunicorn closed the
    # connection: the socket's fileno() is -1 by then (peeking at it raised ValueError,
    # logged as "disconnect watcher callback failed" 109 times in a long-1000 bench run).
    watcher = DisconnectWatcher()
    server, client = socket.socketpair()
    watcher.watch(server, Ended())()
    fd = server.fileno()
    epoll = watcher._epoll_for_this_process()
    server.close()
    client.close()
    watcher._check(epoll, fd)  # the late event, as the watcher thread would handle it
    _watcher_has_run(watcher)  # and the watcher goes on
    watcher.close()
