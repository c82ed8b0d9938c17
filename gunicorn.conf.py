"""gunicorn settings for the gateway: `gunicorn -c gunicorn.conf.py app:app`.

Values come from the same validated Settings as the app (gateway.config), so a bad
environment stops start-up here with one line on stderr, before any worker forks.
gunicorn executes this file again on SIGHUP, after gateway/server/reloading.py has checked
the new settings and built the new app: it then reads the settings that reload accepted.
"""

import contextlib
import resource
import signal
from pathlib import Path
from typing import Any

from gateway import create_app
from gateway.logs import configure_logging
from gateway.server import pinning, reloading

_settings = reloading.settings_for_gunicorn()
configure_logging(_settings)


def raise_open_files_limit() -> None:
    """Thousands of streams need two descriptors each (client and upstream): lift the soft
    open-files limit to the hard one, as Go programs do since Go 1.19 (many shells
    start with a soft limit of 1,024). Workers inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # macOS refuses an unlimited one
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


raise_open_files_limit()

bind = f"0.0.0.0:{_settings.port}"
# gthread: one thread per in-flight request; a stream holds its thread until its last byte.
# This is gthread's ThreadWorker with capacity guards (gateway/server/): request heads are
# read on the main loop within CLIENT_HEADER_TIMEOUT, so idle and slow clients hold no
# thread; /health and /ready are answered there too and /metrics by a thread of its own,
# never queued; a request no thread takes within QUEUE_TIMEOUT gets a 503; a client that
# stops reading is dropped after CLIENT_WRITE_TIMEOUT. On SIGTERM it closes its listening
# socket, so new connections are refused at once instead of hanging through the drain; and
# requests gunicorn itself rejects get an OpenAI-shaped JSON error.
worker_class = "gateway.server.GatewayThreadWorker"
# One process by default: with RATE_LIMIT_STORAGE_URI=memory:// the limit counters live in
# that process, so a second worker would double the limit (the settings refuse it). Scale
# with threads here, with replicas behind Redis, or with GUNICORN_WORKERS plus redis://.
workers = _settings.gunicorn_workers
# Threads cap the streams a worker serves at once; beyond them a request waits up to
# QUEUE_TIMEOUT, then gets a 503. Default 2,048 (GUNICORN_THREADS): measured, 2,000
# concurrent 10 s streams all complete with a peak RSS of 126-150 MB (76 MB idle: the
# threads start at boot, ~19 KB each), where 256 threads shed three quarters of them.
threads = _settings.gunicorn_threads
# Accepted connections may outnumber threads (idle keep-alives, heads being read, queued
# requests); each stream also needs an upstream socket. See raise_open_files_limit below.
worker_connections = max(1000, _settings.gunicorn_threads * 4)
# Load the app once in the master: a config error fails before forking, workers share pages.
preload_app = True
# The worker heartbeat, not a request limit: gthread's main loop keeps it fresh while
# threads stream for minutes, so 30 s only catches a wedged process.
timeout = 30
# On SIGTERM, in-flight requests and streams get this long to finish (Kubernetes'
# terminationGracePeriodSeconds and compose's stop_grace_period must be longer).
graceful_timeout = 120
# Longer than the idle timeout of a load balancer in front (AWS ALB: 60 s), so that the
# balancer, not gunicorn, closes idle connections (the other way round, a request can race
# a closing connection); also lets SDK clients reuse connections between calls.
keepalive = 75
# The app writes one JSON access line per request itself; gunicorn's would duplicate it.
accesslog = None
errorlog = "-"
loglevel = _settings.log_level.lower() if _settings.log_level != "TRACE" else "debug"
logger_class = "gateway.logs.GunicornLogger"
# The heartbeat file goes to memory: the container's root filesystem is read-only.
worker_tmp_dir = "/dev/shm"
# No control socket: nothing uses it, and it would need a writable $HOME.
control_socket_disable = True


def on_starting(server: Any) -> None:
    """Start with empty shared metrics files: stale ones would add a previous run's counts.
    A SIGHUP checks the new settings and builds the new app before gunicorn reloads."""
    if _settings.prometheus_multiproc_dir:
        for stale in Path(_settings.prometheus_multiproc_dir).glob("*.db"):
            stale.unlink()
    reloading.check_reloads(server, _settings, create_app)


def pre_fork(server: Any, worker: Any) -> None:
    """GUNICORN_PIN_WORKERS: the core the new worker will run on (gateway/server/pinning.py)."""
    if _settings.gunicorn_pin_workers:
        pinning.choose_core(worker, server.WORKERS.values())


def post_fork(server: Any, worker: Any) -> None:
    """A booting worker dies at once on SIGTERM, SIGINT or SIGQUIT: it has nothing to drain.

    Until the worker installs its own handlers, it has the master's, which only queue the
    signal in the child's copy of the master, where nobody reads it: the worker would boot
    and serve on, and the master's shutdown wait for it all of graceful_timeout. A SIGTERM
    soon after a SIGHUP meets a booting worker (the master handles it during the reload's
    drain, see gateway/server/reloading.py)."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    if _settings.gunicorn_pin_workers:
        pinning.pin(worker)


def post_worker_init(worker: Any) -> None:
    """Mark the app as draining on SIGTERM, so /ready turns 503 while streams finish."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum: int, frame: Any) -> None:
        worker.wsgi.extensions["gateway.draining"].set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges from the shared metrics files."""
    if _settings.prometheus_multiproc_dir:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
