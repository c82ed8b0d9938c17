"""`GET /metrics` rendered by one thread of its own, never queued behind request threads.

A scrape queued behind busy threads would time out, and Prometheus would see a gateway at
capacity as down, just when its metrics matter most. It cannot be answered on the main loop
as /health and /ready are (probes.py): the view runs the `before_scrape` steps and the live
collectors, which read the token store (Redis or SQLite: the network, file locks). So one
thread renders scrapes, through the app as the probes are (METRICS_KEY is checked by the
view); a few may wait for it, and beyond those a scrape is answered 503 at once. The main
loop writes the answer (sending.py) and finishes the connection.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from typing import Any

from gateway.server.replies import RETRY_AFTER_SECONDS, error_reply
from gateway.server.threads import start_every_thread

# Scrapes rendering or waiting to: a few targets' Prometheus servers scraping at once. More
# means the store the scrape reads is slow, and waiting would only time them all out.
MAX_SCRAPES = 4


class ScrapeThread:
    """One thread for scrapes; `pending` is kept by the main loop alone."""

    def __init__(self) -> None:
        self._pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="scrape")
        # Started now, at boot: a thread started on the first scrape would have the main
        # loop wait for it to run (see threads.py).
        start_every_thread(self._pool, 1)
        self.pending = 0

    def full(self) -> bool:
        return self.pending >= MAX_SCRAPES

    def submit(
        self, render: Callable[[], Any], done: Callable[[futures.Future[Any]], None]
    ) -> None:
        """Render on the scrape thread; `done(future)` is called on that thread after."""
        self.pending += 1
        self._pool.submit(render).add_done_callback(done)

    def ended(self) -> None:
        self.pending -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def scrape_busy_reply() -> bytes:
    """The 503 for a scrape beyond the ones already waiting for the scrape thread."""
    message = (
        f"The gateway is already answering {MAX_SCRAPES} scrapes of /metrics. "
        "Retry after Retry-After seconds."
    )
    return error_reply(
        503, "Service Unavailable", message, [("Retry-After", str(RETRY_AFTER_SECONDS))]
    )
