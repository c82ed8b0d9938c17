"""Everything between a view and the provider's socket.

- `client.py`: `UpstreamClient` (one exchange: send, map failures, build the client's
  response) and `upstream_for`, the one place that picks the upstream for a request;
- `attempts.py`: what `upstream_for(model).relay(...)` runs: a plan's deployments in turn
  (fallback, the router told how each did, what the client gets when all fail); it sees
  the client only through its `Exchanges` protocol, so the import goes one way;
- `dialect.py`: what one attempt sends and how its answer comes back (`Leg`): Chat
  Completions' own (`ChatDialect`), or a view's for Messages and Responses;
- `connection.py`: the pooled adapter and its connections (1xx never taken for the
  answer) and the `Exchange` that another thread can end;
- `bodies.py`: answer bodies relayed as they arrive, bounded and masked; `streams.py`:
  event streams, relayed or translated, and read on after the answer for its usage;
- `headers.py`: which headers cross, each way; `scrub.py`: masking echoed secrets;
- `sse.py`: the usage chunks of relayed streams, and SSE data for translated ones;
- `router.py`: routes, deployment order, cooldowns and capacity (`Router`, `Plan`);
- `catalog.py`: the model list of `/v1/models`; `edits.py`: the few body changes.

May import gateway.config, errors, record, secrets and disconnects; never a blueprint.
"""

from gateway.upstream.bodies import Client
from gateway.upstream.catalog import ModelCatalog
from gateway.upstream.client import Routed, UpstreamClient, upstream_for
from gateway.upstream.router import Plan, Router

__all__ = ["Client", "ModelCatalog", "Plan", "Routed", "Router", "UpstreamClient", "upstream_for"]
