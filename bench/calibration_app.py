"""The calibration relay: the smallest Flask + `requests` relay, the floor of the gateway's stack.

One view, one pooled `HTTPAdapter`, nothing else: no auth, limits, metrics, logging, header
filtering or disconnect watching. bench.run serves it with gunicorn gthread and the
gateway's own worker, thread and keep-alive values (bench/calibration.py) and measures it
in the same run, so a gateway figure reads as "its cost over the floor of its own stack".

    TARGET_API_URL=http://127.0.0.1:9100/v1 TARGET_API_KEY=sk-... BENCH_POOL_SIZE=256 \\
        gunicorn -k gthread --threads 256 bench.calibration_app:app
"""

from __future__ import annotations

import os

import requests
from flask import Flask, Response, request
from requests.adapters import HTTPAdapter

_URL = os.environ["TARGET_API_URL"].rstrip("/") + "/chat/completions"
_AUTHORIZATION = f"Bearer {os.environ['TARGET_API_KEY']}"
# As the gateway: one upstream connection per thread, and a POST is never retried.
_adapter = HTTPAdapter(
    pool_connections=1, pool_maxsize=int(os.environ.get("BENCH_POOL_SIZE", "10")), max_retries=0
)
app = Flask(__name__)


@app.post("/v1/chat/completions")
def chat_completions() -> Response:
    prepared = requests.Request(
        "POST",
        _URL,
        data=request.get_data(),
        headers={"Authorization": _AUTHORIZATION, "Content-Type": "application/json"},
    ).prepare()
    upstream = _adapter.send(prepared, stream=True, timeout=(10, 600))
    content_type = upstream.headers.get("Content-Type", "application/json")
    if content_type.startswith("text/event-stream"):
        relayed = Response(upstream.iter_content(chunk_size=None), upstream.status_code)
    else:
        relayed = Response(upstream.content, upstream.status_code)
    relayed.headers["Content-Type"] = content_type
    # Hands the upstream connection back to the pool (or drops it, if the client left).
    relayed.call_on_close(upstream.close)
    return relayed
