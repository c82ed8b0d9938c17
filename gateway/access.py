"""Request ids, the access log line and request metrics: the start and end of every request."""

from __future__ import annotations

import random
import re
from functools import partial

from flask import Flask, Response, current_app, g, request
from loguru import logger

from gateway.logs import request_id_var
from gateway.metrics import GatewayMetrics
from gateway.policy.prices import NANOS, money
from gateway.record import RequestRecord

# A client's own request id is kept if it is short and plain enough to log and forward.
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Metric labels take only these; anything else a client invents is "OTHER", so that
# unauthenticated requests cannot create unbounded Prometheus series.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def start_request() -> None:
    """before_request, registered first: every later step and log line has the request id."""
    offered = request.headers.get("X-Request-ID", "")
    request_id = offered if offered and _SANE_REQUEST_ID.fullmatch(offered) else _new_id()
    request_id_var.set(request_id)
    rule = request.url_rule
    g.record = RequestRecord(
        request_id=request_id,
        method=request.method if request.method in _KNOWN_METHODS else "OTHER",
        path=request.path[:500],
        route=rule.rule if rule is not None else "unmatched",
    )


def _new_id() -> str:
    # 128 random bits as 32 hex digits, as uuid4().hex without its system call: a request
    # id names a request in logs, it guards nothing.
    return f"{random.getrandbits(128):032x}"


def finish_response(response: Response) -> Response:
    """after_request: stamp the response; log and count once its last byte has been sent."""
    record: RequestRecord | None = g.get("record")
    if record is None:  # a failure before start_request; nothing to attach to
        return response
    response.headers["X-Request-ID"] = record.request_id
    record.status = response.status_code
    caller = g.get("caller")
    if caller is not None:  # a refused key's id was set by the key check itself
        record.key_id, record.key_name = caller.key_id, caller.name
        record.team = caller.team.name if caller.team is not None else None
    metrics: GatewayMetrics = current_app.extensions["gateway.metrics"]
    if record.event_stream:
        metrics.streams_in_flight.inc()
    response.call_on_close(partial(_complete, record, metrics, record.event_stream))
    return response


def _complete(record: RequestRecord, metrics: GatewayMetrics, streamed: bool) -> None:
    duration = record.elapsed()
    for hook in record.on_complete:
        try:
            hook(record)
        except Exception as exc:  # noqa: BLE001 - the request is over; log and count it anyway
            logger.opt(exception=exc).error("request completion hook failed")
    provider, model = record.provider or "none", metrics.model_label(record.model)
    metrics.requests_for(record.route, record.method, str(record.status), provider, model).inc()
    metrics.latency_for(record.route, provider, model).observe(duration)
    if streamed:
        metrics.streams_in_flight.dec()
    if record.ttfb is not None:
        metrics.stream_ttfb_for(provider, model).observe(record.ttfb)
    if record.upstream_error:
        metrics.upstream_errors.labels(record.upstream_error, provider, model).inc()
    if record.key_id is not None:
        _count_for_key(record, metrics, provider, model)
    _log_access(record, duration)
    request_id_var.set(None)


def _count_for_key(
    record: RequestRecord, metrics: GatewayMetrics, provider: str, model: str
) -> None:
    key = record.key_name or record.key_id or ""
    metrics.key_requests_for(key, model, provider, str(record.status)).inc()
    for kind in ("prompt_tokens", "completion_tokens"):
        if record.usage and kind in record.usage:
            tokens = record.usage[kind]
            metrics.tokens_for(kind.removesuffix("_tokens"), key, model, provider).inc(tokens)
    if record.cost:
        metrics.cost_for(key, record.team or "none", model, provider).inc(record.cost / NANOS)


def _log_access(record: RequestRecord, duration: float) -> None:
    fields: dict[str, object] = {
        "request_id": record.request_id,
        "method": record.method,
        "path": record.path,
        "status": record.status,
        "duration_ms": round(duration * 1000, 2),
        "key_id": record.key_id,
        "key_name": record.key_name,
        "model": record.model[:200] if record.model else None,  # a client-chosen string
        "stream": record.stream,
        "upstream_status": record.upstream_status,
    }
    if record.ttfb is not None:
        fields["ttfb_ms"] = round(record.ttfb * 1000, 2)
    # Routing: who answered, under which model name, and why earlier attempts failed.
    if record.provider:
        fields["provider"] = record.provider
        fields["upstream_model"] = (record.upstream_model or "")[:200]
    if record.attempts:
        fields["attempts"] = record.attempts
    if record.abandoned_tokens:  # charged besides the usage (see settle_usage)
        fields["abandoned_tokens"] = record.abandoned_tokens
    if record.upstream_request_id:
        fields["upstream_request_id"] = record.upstream_request_id
    if record.upstream_error:
        fields["upstream_error"] = record.upstream_error
    if record.client_disconnected:
        fields["client_disconnected"] = True
    if record.usage:
        fields["usage"] = record.usage
    if record.usage_estimated:
        fields["usage_estimated"] = True
    if record.team:
        fields["team"] = record.team
    if record.cost is not None:  # an exact decimal string, in the prices' currency
        fields["cost"] = money(record.cost)
        fields["currency"] = record.currency
        if record.usage_estimated:
            fields["cost_estimated"] = True
    # Keyword arguments land in the record's extra (and fill the message) without building
    # a bound logger per request.
    logger.info("{method} {path} {status}", event="access", **fields)


def init_access(app: Flask) -> None:
    app.before_request(start_request)
    app.after_request(finish_response)
