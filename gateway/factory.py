"""`create_app`: builds settings, logging, extensions, the upstream client, error handlers
and blueprints. The only module that imports the blueprints."""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import partial
from typing import Any

from flask import Blueprint, Flask, Response, request
from flask_cors import CORS

from gateway import chat, health, messages, metrics, models, responses, usage
from gateway.access import init_access
from gateway.auth import PROTECTED_BLUEPRINT, KeyRing, require_api_key
from gateway.config import Settings, load_settings
from gateway.errors import register_error_handlers
from gateway.limits import init_rate_limits
from gateway.logs import configure_logging
from gateway.memory import return_large_buffers_to_the_system
from gateway.metrics import GatewayMetrics
from gateway.policy import TokenBudget
from gateway.policy.enforce import init_policy
from gateway.policy.prices import PriceBook
from gateway.policy.report import BudgetGauges, QuotaGauges
from gateway.stored import ResponseStore
from gateway.upstream import ModelCatalog, Router, UpstreamClient
from gateway.upstream.router import keep_cooldowns_fresh

# Headers a browser client may read from our responses.
_EXPOSED_HEADERS = [
    "X-Request-ID",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "Retry-After",
    "x-gateway-cost",
    "x-gateway-cost-currency",
]


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or load_settings()
    configure_logging(settings)
    return_large_buffers_to_the_system()
    app = GatewayFlask("gateway", static_folder=None)
    # "/v1//chat/completions" is a 404 in the OpenAI shape, not Werkzeug's HTML redirect.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_body_bytes
    app.extensions["gateway.settings"] = settings
    keys = app.extensions["gateway.keys"] = KeyRing(
        settings.gateway_api_keys,
        settings.key_policies,
        settings.key_defaults,
        settings.rate_limit_per_minute,
        settings.teams,
    )
    metrics = app.extensions["gateway.metrics"] = GatewayMetrics(settings)
    # Routing state (cooldowns, in-flight counts) lives in the app: a reload builds anew.
    router = Router(settings, on_cooldown=metrics.cooldown_changed)
    metrics.before_scrape.append(router.refresh)
    if settings.prometheus_multiproc_dir:  # a scrape reaches one worker: each keeps its own
        keep_cooldowns_fresh(router)
    upstream = app.extensions["gateway.upstream"] = UpstreamClient(settings, router, metrics)
    app.extensions["gateway.models"] = ModelCatalog(upstream)
    # Set on SIGTERM (see gunicorn.conf.py): /ready answers 503 while streams drain.
    app.extensions["gateway.draining"] = threading.Event()
    # Anthropic's clients read errors in Anthropic's shape on the Messages routes.
    register_error_handlers(app, [(messages.PREFIX, messages.error_shape)])
    # Order matters: request id first, then the key check, then the limiter (after init).
    init_access(app)
    app.before_request(require_api_key)
    init_rate_limits(app, settings, metrics, any(c.rpm > 0 for c in keys.callers))
    # memory:// keeps quotas in a file that outlives workers; with no token limit at all
    # there is nothing to keep, and the counts for reports stay in memory.
    limited = any(c.token_limit(w) for c in keys.callers for w in ("minute", "day", "month"))
    limited = limited or any(c.budgeted for c in keys.callers) or bool(keys.teams)
    budget = TokenBudget(
        settings.rate_limit_storage_uri,
        settings.token_store_file if limited else None,
        settings.token_reservation_ttl,
        # /v1/usage reports every key; without it, keys with no limit are counted in metrics only.
        report_every_key=bool(settings.admin_api_key),
    )
    init_policy(app, budget, PriceBook(settings.pricing, settings.routes))
    metrics.add_live_collector(QuotaGauges(budget, keys))
    metrics.add_live_collector(BudgetGauges(budget, keys))
    app.extensions["gateway.responses"] = ResponseStore.of(
        settings.rate_limit_storage_uri, settings.responses_ttl, settings.responses_memory_bytes
    )
    # always_send=False: CORS headers only for browsers (requests with an Origin header).
    CORS(
        app,
        origins=list(settings.cors_allowed_origins),
        expose_headers=_EXPOSED_HEADERS,
        always_send=False,
    )
    _cors_only_for_browsers(app)
    _register_blueprints(app, settings)
    return app


class GatewayFlask(Flask):
    """Flask, remembering which of its hooks are plain functions.

    Flask asks `inspect.iscoroutinefunction` of every before/after-request hook and view
    on every request (~2% of a request's CPU with this gateway's eight hooks); none of
    them changes, so the first answer is kept.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._synced: dict[Callable[..., Any], Callable[..., Any]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        try:
            return self._synced[func]
        except KeyError:
            synced = super().ensure_sync(func)
        except TypeError:  # not hashable: asked each time, as Flask does
            return super().ensure_sync(func)
        if len(self._synced) < 1024:
            self._synced[func] = synced
        return synced


def _cors_only_for_browsers(app: Flask) -> None:
    """flask-cors's response step, run only for requests with an Origin: without one
    (always_send=False) it adds nothing, after matching the path and reading the options."""
    steps = app.after_request_funcs.setdefault(None, [])
    for index, step in enumerate(steps):
        if getattr(step, "__name__", "") == "cors_after_request":
            steps[index] = partial(_when_origin, step)


def _when_origin(step: Callable[[Response], Any], response: Response) -> Any:
    return step(response) if request.headers.get("Origin") else response


def _register_blueprints(app: Flask, settings: Settings) -> None:
    if settings.health_check_enabled:
        app.register_blueprint(health.bp)
    app.register_blueprint(metrics.bp)
    # Outside the v1 blueprint: guarded by GATEWAY_ADMIN_KEY, never by a gateway key.
    app.register_blueprint(usage.bp)
    v1 = Blueprint(PROTECTED_BLUEPRINT, __name__, url_prefix="/v1")
    v1.register_blueprint(models.bp)
    v1.register_blueprint(chat.bp)
    v1.register_blueprint(messages.bp)
    v1.register_blueprint(responses.bp)
    app.register_blueprint(v1)
