"""The disconnect watcher, on real socket pairs."""

from __future__ import annotations

import socket
import threading

from gateway.disconnects import DisconnectWatcher


def test_closing_the_peer_calls_back() -> None:
    watcher = DisconnectWatcher()
    server, client = socket.socketpair()
    gone = threading.Event()
    with server:
        watcher.watch(server, gone.set)
        client.close()
        assert gone.wait(10)


def test_no_call_back_after_unwatch_or_while_the_peer_stays() -> None:
    watcher = DisconnectWatcher()
    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    called: list[str] = []
    with first, second, second_peer:
        unwatch = watcher.watch(first, lambda: called.append("first"))
        watcher.watch(second, lambda: called.append("second"))
        unwatch()
        first_peer.close()
        # A third pair proves the watcher thread has run past the close above.
        third, third_peer = socket.socketpair()
        done = threading.Event()
        with third:
            watcher.watch(third, done.set)
            third_peer.close()
            assert done.wait(10)
        # Inside the block: leaving it closes second_peer, which is a disconnect.
        assert called == []


def test_data_from_the_client_is_not_a_disconnect() -> None:
    watcher = DisconnectWatcher()
    server, client = socket.socketpair()
    called: list[bool] = []
    with server, client:
        watcher.watch(server, lambda: called.append(True))
        client.sendall(b"GET / HTTP/1.1\r\n")
        probe, probe_peer = socket.socketpair()
        done = threading.Event()
        with probe:
            watcher.watch(probe, done.set)
            probe_peer.close()
            assert done.wait(10)
    assert called == []


def test_a_failing_callback_does_not_stop_the_watcher() -> None:
    watcher = DisconnectWatcher()

    def fail() -> None:
        raise AttributeError("no shutdown here")

    first, first_peer = socket.socketpair()
    second, second_peer = socket.socketpair()
    gone = threading.Event()
    with first, second:
        watcher.watch(first, fail)
        first_peer.close()
        watcher.watch(second, gone.set)
        second_peer.close()
        assert gone.wait(10)
    watcher.close()
