"""gunicorn's gthread worker, refusing new connections while it drains.

On SIGTERM the stock gthread worker stops accepting but keeps its copy of the listening
socket open until the drain ends, so for up to `graceful_timeout` the kernel still
completes new TCP handshakes that nobody will serve: clients hang instead of being
refused and retrying elsewhere. Closing this worker's copy when it stops accepting makes
the port refuse new connections at once (the arbiter has already closed its own copy).
"""

from __future__ import annotations

from gunicorn.workers.gthread import ThreadWorker


class DrainingThreadWorker(ThreadWorker):
    def set_accept_enabled(self, enabled: bool) -> None:
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()
