"""The gunicorn worker the gateway runs on: gthread, guarded for thousands of streams.

- `worker.py`: `GatewayThreadWorker`, gunicorn's `ThreadWorker` with the guards wired in.
- `heads.py`: when a request head read on the main loop is complete, and how large it may be.
- `replies.py`: the OpenAI-shaped error answers the worker writes itself.
- `threads.py`: the request threads (stack size, started at boot).
- `probes.py`: answering `/health` and `/ready` on the main loop, through the app.
- `scrapes.py`: answering `/metrics` on a thread of its own, through the app.
- `sending.py`: writing an answer larger than a socket buffer without blocking the main loop.
- `shedding.py`: the load the worker sheds (503, 408, 431, dropped clients), counted in the
  app's metrics.
- `lingering.py`: closing client sockets gracefully without blocking the main loop.
- `draining.py`: a worker's drain bounded by graceful_timeout (no new request, streams
  ended with their error event, exit on time).
- `handover.py`: workers report their boot; a reload's old workers serve until the new
  ones are ready, and stay if they cannot boot.
- `reloading.py`: SIGHUP in the master: new settings and app checked before any worker
  is replaced (also imports `gateway.logs`; gunicorn.conf.py passes it the app factory).

May import `gateway.config` and `gateway.errors` only (and gunicorn); the app reaches it
only through gunicorn.conf.py's `worker_class` and hooks.
"""

from gateway.server.worker import GatewayThreadWorker

__all__ = ["GatewayThreadWorker"]
