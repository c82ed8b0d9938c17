"""The models the gateway serves, for `/v1/models` and `/v1/models/<id>`.

The configured public names come first (`owned_by` the provider of their first
deployment). Then, for each provider behind a `*` route, the models it lists itself that
would be routed to it by that route: fetched from its `/models`, kept for `ttl` seconds
(per process), skipped while it cannot be reached or answers anything but a model list.
A failed listing is kept only `failure_ttl` seconds, and when no provider could list its
models and no name is configured the answer is a 502, not an empty list that model
pickers would show as "no models" without saying why.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson
import requests
import urllib3
from loguru import logger
from requests.structures import CaseInsensitiveDict

from gateway.errors import GatewayError
from gateway.upstream.bodies import READ_ERRORS, AnswerTooLargeError, pieces
from gateway.upstream.client import UpstreamClient
from gateway.upstream.connection import Exchange, current_exchange
from gateway.upstream.router import Router

# A provider's model list is a few KB; anything much larger is not one.
_MAX_LIST_BYTES = 4 * 1024 * 1024
# A listing waits this long at most for a provider, which may be down: to connect, between
# two bytes, and in all (a provider dripping its list a byte at a time never trips the read
# timeout, and every /v1/models request would wait on it).
_LIST_TIMEOUT = (5.0, 10.0)
_LIST_DEADLINE = 10.0
# A provider that could not list its models is asked again this soon: long enough that a
# burst of /v1/models requests sends it one listing, short enough to notice it is back.
_FAILURE_TTL = 5.0
_MAX_ID_LENGTH = 256
Listed = tuple[tuple[str, int], ...]  # (id, created) as the provider lists them


@dataclass
class _Cached:
    models: Listed | None  # None: the provider could not list them
    until: float


class ModelCatalog:
    def __init__(
        self,
        client: UpstreamClient,
        *,
        ttl: float = 60.0,
        failure_ttl: float = _FAILURE_TTL,
        clock: Callable[[], float] = time.monotonic,
        deadline: float = _LIST_DEADLINE,
    ) -> None:
        self._client = client
        self._router: Router = client.router
        self._ttl = ttl
        self._failure_ttl = failure_ttl
        self._clock = clock
        self._deadline = deadline
        self._cache: dict[str, _Cached] = {}
        owners = [d.provider for r in self._router.pattern_routes for d in r.deployments]
        self._wildcard_providers = tuple(dict.fromkeys(owners))
        # One fetch per provider at a time: concurrent listings wait for it (at most the
        # deadline) instead of each sending its own when the cache expires.
        self._fetching = {provider: threading.Lock() for provider in self._wildcard_providers}

    def models(self) -> list[dict[str, Any]]:
        found = {
            r.name: _model(r.name, 0, r.deployments[0].provider) for r in self._router.exact_routes
        }
        unlisted = []
        for provider in self._wildcard_providers:
            listed = self._listed(provider)
            if listed is None:
                unlisted.append(provider)
            for model_id, created in listed or ():
                if model_id not in found and self._routed_to(model_id, provider):
                    found[model_id] = _model(model_id, created, provider)
        if unlisted and not found and len(unlisted) == len(self._wildcard_providers):
            raise GatewayError(
                502,
                f"No provider could list its models ({', '.join(unlisted)}): they are "
                "unreachable or answered with an error.",
            )
        return list(found.values())

    def find(self, model_id: str) -> dict[str, Any] | None:
        return next((m for m in self.models() if m["id"] == model_id), None)

    def _routed_to(self, model_id: str, provider: str) -> bool:
        route = self._router.route(model_id)
        return (
            route is not None
            and route.is_pattern
            and any(d.provider == provider for d in route.deployments)
        )

    def _listed(self, provider: str) -> Listed | None:
        cached = self._cache.get(provider)
        if cached is None or cached.until <= self._clock():
            with self._fetching[provider]:
                cached = self._cache.get(provider)
                if cached is None or cached.until <= self._clock():
                    models = self._fetch(provider)
                    ttl = self._ttl if models is not None else self._failure_ttl
                    cached = self._cache[provider] = _Cached(models, self._clock() + ttl)
        return cached.models

    def _fetch(self, provider: str) -> Listed | None:
        client = self._client
        target = client.targets[provider]
        prepared = requests.PreparedRequest()
        prepared.method = "GET"
        prepared.url = target.base_url + "/models"
        prepared.headers = CaseInsensitiveDict({**target.headers, "Accept": "application/json"})
        exchange = Exchange()
        exchange.unwatch = client.disconnects.watch(
            None, exchange.end, time.monotonic() + self._deadline
        )
        token = current_exchange.set(exchange)
        try:
            upstream = client.adapter.send(
                prepared,
                stream=True,
                timeout=(min(target.timeout[0], _LIST_TIMEOUT[0]), _LIST_TIMEOUT[1]),
                verify=client.verify,
                proxies=dict(target.proxies),
            )
        except (requests.RequestException, ValueError) as exc:
            exchange.release()
            logger.warning("cannot list the models of {}: {}", provider, type(exc).__name__)
            return None
        finally:
            current_exchange.reset(token)
        exchange.hold(upstream)
        try:
            if upstream.status_code != 200:
                logger.warning("{} answered {} to /models", provider, upstream.status_code)
                return None
            body = b"".join(pieces(upstream, _MAX_LIST_BYTES))
        except (*READ_ERRORS, AnswerTooLargeError, urllib3.exceptions.HTTPError) as exc:
            logger.warning("cannot list the models of {}: {}", provider, type(exc).__name__)
            return None
        finally:
            exchange.release()
        if exchange.ended_by is not None:  # a close-delimited list, cut at the deadline
            logger.warning("{} did not list its models within {:g} s", provider, self._deadline)
            return None
        return self._parsed(provider, body)

    def _parsed(self, provider: str, body: bytes) -> Listed | None:
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list):
            logger.warning("{} answered /models with something that is not a list", provider)
            return None
        listed = []
        for item in data:
            model_id = item.get("id") if isinstance(item, dict) else None
            # An id holding a secret (a provider echoing keys) is dropped, not masked.
            if _plain(model_id) and self._client.mask.text(model_id) == model_id:
                created = item.get("created")
                listed.append((model_id, created if isinstance(created, int) else 0))
        return tuple(listed)


def _plain(model_id: object) -> TypeGuard[str]:
    return isinstance(model_id, str) and 0 < len(model_id) <= _MAX_ID_LENGTH


def _model(model_id: str, created: int, owner: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owner}
