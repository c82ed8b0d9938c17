"""Everything between a view and the provider's socket.

- `client.py`: `UpstreamClient.relay` (send, map failures, build the client's response)
  and `upstream_for`, the one place that picks the upstream for a request;
- `connection.py`: the pooled adapter and its connections (1xx never taken for the
  answer) and the `Exchange` that another thread can end;
- `bodies.py`: answer bodies relayed as they arrive, bounded and masked;
- `headers.py`: which headers cross, each way; `scrub.py`: masking echoed secrets.

May import gateway.config, errors, record, secrets and disconnects; never a blueprint.
"""

from gateway.upstream.bodies import Client
from gateway.upstream.client import UpstreamClient, upstream_for

__all__ = ["Client", "UpstreamClient", "upstream_for"]
