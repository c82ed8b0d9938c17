"""`kill -HUP <master>`: new settings and a new app, checked before any worker is replaced.

gunicorn's own reload re-executes gunicorn.conf.py, then forks new workers and sends the
old ones SIGTERM (they finish their requests and streams within graceful_timeout). Alone it
is not enough here: with `preload_app` the new workers would serve the app cached at start,
old keys and all, and a `ConfigError` raised while gunicorn.conf.py runs (a `SystemExit`)
would end the master with every stream open. So the master checks first:

1. load the settings (`load_settings`: the environment, ENV_FILE, GATEWAY_CONFIG), check
   that workers of the new thread count fit this process's limits (`boot_shortfall`:
   address space, tasks, open files) and build the app from them, here in the master;
2. if any of it fails: one error line says why, and nothing else happens (same workers,
   same streams, same settings: a restart for nothing would also cut streams longer than
   graceful_timeout and, with memory://, reset the rate-limit counters);
3. otherwise: the new app replaces gunicorn's cached one, then gunicorn's reload runs,
   without its wait for the old workers (see `_without_drain_wait`), and the old workers
   serve until the new ones are ready; if a new one cannot boot after all, the reload is
   rolled back (see handover.py).

May import `gateway.config` and `gateway.logs`; the app factory is passed in by
gunicorn.conf.py (only the entry points import it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from loguru import logger

from gateway.config import ConfigError, Settings, load_settings
from gateway.logs import configure_logging
from gateway.server.handover import Handover, open_reports
from gateway.server.threads import boot_shortfall


@dataclasses.dataclass
class _InForce:
    """The settings a running master is on: gunicorn.conf.py reads them when gunicorn
    executes it again at a reload.

    Module state on purpose: gunicorn executes gunicorn.conf.py afresh at every reload, so
    the file cannot remember what was accepted, and loading again there could meet a file
    changed since the check. This module is imported once per process and outlives those
    executions. Set only in a gunicorn master (by `check_reloads`), so anything else that
    executes gunicorn.conf.py (the deployment tests) still gets freshly loaded settings.
    """

    settings: Settings | None = None


_in_force = _InForce()


def settings_for_gunicorn() -> Settings:
    """For gunicorn.conf.py: at start-up freshly loaded (a `ConfigError` then stops the
    master with one line, as it should); in a running master, the settings it is on."""
    return load_settings() if _in_force.settings is None else _in_force.settings


def check_reloads(server: Any, settings: Settings, build_app: Callable[[Settings], Any]) -> None:
    """From now on, the master's reload (SIGHUP) loads and builds the new configuration first.

    `settings` are the ones gunicorn.conf.py gave gunicorn at start-up. The arbiter's HUP
    handler calls `self.reload()`; gunicorn has no hook before it that could refuse a
    reload, hence the wrapper on this one arbiter instance.
    """
    _in_force.settings = settings
    gunicorn_reload = server.reload
    handover = Handover.install(server, open_reports())

    def reload() -> None:
        if handover.pending:
            logger.warning(
                "reload ignored: the previous reload's workers are still starting; "
                "send SIGHUP again once they serve"
            )
            return
        previous = settings_for_gunicorn()
        accepted = _load_and_build(previous, build_app)
        if accepted is None:
            return
        new_settings, app = accepted
        handover.begin(roll_back=_rolling_back(server, previous, server.app.callable))
        _in_force.settings = new_settings
        # gunicorn's reload keeps `callable`; setup() and the new workers' wsgi() return it.
        server.app.callable = app
        logger.info(
            "configuration reloaded: {}; new workers start on it, the previous ones serve "
            "until they are ready, then finish their requests in flight",
            describe_changes(previous, new_settings),
        )
        _without_drain_wait(server, gunicorn_reload)

    server.reload = reload


def _rolling_back(server: Any, previous: Settings, app: Any) -> Callable[[], None]:
    """Back to `previous` and its app, as if the reload had been refused."""

    def roll_back() -> None:
        _in_force.settings = previous
        server.app.callable = app
        server.app.reload()  # executes gunicorn.conf.py again: it reads `previous`
        server.setup(server.app)

    return roll_back


class _DrainInMainLoop(Exception):  # noqa: N818 - a way out, not an error
    """Ends gunicorn's reload at its wait for the old workers."""


def _without_drain_wait(server: Any, gunicorn_reload: Callable[[], None]) -> None:
    """Run gunicorn's reload up to its spawning the new workers and SIGTERMing the old ones.

    gunicorn 27's reload then loops, reaping, until the old workers have exited, up to
    graceful_timeout: the master handles no signal meanwhile, so a SIGTERM during that
    drain would wait for it, then get a whole graceful_timeout of its own (twice 120 s,
    past terminationGracePeriodSeconds). That loop calls `reap_workers` first thing: the
    wrapper below reaps once and leaves the reload there. The main loop then reaps the old
    workers as they exit (SIGCHLD) and stays free for the next signal; on SIGTERM its stop
    waits for all workers, old ones included, within one graceful_timeout.

    gunicorn waited "to prevent double SIGTERM": until they exit, the main loop's
    manage_workers sends the old workers (beyond `workers`, oldest first) SIGTERM again
    each turn. Harmless to gthread's worker, which ours is: its handle_exit acts only
    while `alive`, its drain deadline is set once, on the first signal, and the handler
    gunicorn.conf.py adds only sets an event.
    """
    reap_workers = server.reap_workers

    def reap_then_leave() -> None:
        reap_workers()
        raise _DrainInMainLoop

    server.reap_workers = reap_then_leave
    try:
        gunicorn_reload()
    except _DrainInMainLoop:
        pass
    finally:
        server.reap_workers = reap_workers


def _load_and_build(
    previous: Settings, build_app: Callable[[Settings], Any]
) -> tuple[Settings, Any] | None:
    try:
        settings = load_settings()
    # Whatever fails, the master must go on serving: ConfigError is a SystemExit, and an
    # unreadable file or a bug must not end the master either.
    except (ConfigError, Exception) as error:  # noqa: BLE001
        _refuse(_reason(error))
        return None
    if settings.port != previous.port:
        # Rebinding under a running master would leave the container's published port, the
        # Service and the probes pointing at nothing (or end the master if the port is taken).
        logger.warning(
            "PORT changed to {}: it applies at the next restart; still listening on {}",
            settings.port,
            previous.port,
        )
        settings = dataclasses.replace(settings, port=previous.port)
    if shortfall := boot_shortfall(settings.gunicorn_threads, settings.gunicorn_workers):
        _refuse(shortfall)
        return None
    try:
        return settings, build_app(settings)
    except (ConfigError, Exception) as error:  # noqa: BLE001 - as above
        configure_logging(previous)  # the factory configured logging for the new settings
        _refuse(_reason(error))
        return None


def _reason(error: BaseException) -> str:
    if isinstance(error, ConfigError):
        return error.message  # names the variable (or file field), never a secret
    if isinstance(error, OSError):
        return str(error)  # a file that cannot be read: its name and why
    # Anything else may quote the text it failed on, a secret included: its kind only.
    return f"{type(error).__name__} while loading the new configuration"


def _refuse(reason: str) -> None:
    logger.error("configuration reload refused, the previous configuration stays: {}", reason)


def describe_changes(previous: Settings, settings: Settings) -> str:
    """Which settings changed, by name; keys as counts. Never a value: many are secrets."""
    changed = [
        f.name
        for f in dataclasses.fields(settings)
        if getattr(previous, f.name) != getattr(settings, f.name)
    ]
    if not changed:
        return "no setting changed"
    names = ", ".join(_with_key_counts(name, previous, settings) for name in changed)
    return f"{len(changed)} setting{'s' if len(changed) > 1 else ''} changed: {names}"


def _with_key_counts(name: str, previous: Settings, settings: Settings) -> str:
    if name != "gateway_api_keys":
        return name
    before, after = set(previous.gateway_api_keys), set(settings.gateway_api_keys)
    return f"gateway_api_keys ({len(after - before)} added, {len(before - after)} removed)"
