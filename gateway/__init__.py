"""An OpenAI-compatible gateway in front of DashScope (Qwen) or any OpenAI-compatible API."""

from gateway.factory import create_app

__all__ = ["create_app"]
