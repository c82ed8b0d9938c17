"""Logging through loguru: one JSON object per line (or text for humans), secrets redacted.

The standard `logging` module (gunicorn, urllib3, flask-limiter) is routed into loguru, so
everything the process prints has one shape and carries the current request id.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import orjson
from gunicorn import glogging
from loguru import logger

from gateway.config import Settings
from gateway.log_output import LineOutput
from gateway.secrets import spellings

# Set per request by gateway.access; streams run in the same thread, so it holds for them too.
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

_WARNING = 30  # loguru's WARNING level number
# The JSON sink's output, once configured.
_output: LineOutput | None = None

_TEXT_FORMAT = (
    "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {extra[request_id]} | {message} | {extra}"
)


def configure_logging(settings: Settings) -> None:
    """Replace loguru's handlers: called by the factory and by gunicorn.conf.py at start-up."""
    redact = _redactor(settings.secrets)
    logger.remove()
    logger.configure(patcher=_add_request_id)
    if settings.log_format == "json":
        logger.add(_json_sink(redact), level=settings.log_level, format="{message}")
    else:
        logger.add(
            _text_sink(redact),
            level=settings.log_level,
            format=_TEXT_FORMAT,
            colorize=False,
            # diagnose=False: loguru would otherwise print local variables (keys!) in tracebacks.
            diagnose=False,
            backtrace=False,
        )
    logging.basicConfig(handlers=[InterceptHandler()], level=0, force=True)
    # urllib3 logs every new connection at DEBUG; that is noise on each pooled request.
    logging.getLogger("urllib3").setLevel(logging.WARNING)


def _add_request_id(record: Any) -> None:
    record["extra"].setdefault("request_id", request_id_var.get())


def _redactor(secrets: tuple[str, ...]) -> Callable[[str], str]:
    # Lines are redacted after JSON encoding, so also look for each secret as JSON spells it.
    forms = {form for secret in secrets for form in spellings(secret)}
    ordered = sorted(forms, key=len, reverse=True)

    def redact(text: str) -> str:
        for secret in ordered:
            if secret in text:
                text = text.replace(secret, "[REDACTED]")
        return text

    return redact


def _json_sink(redact: Callable[[str], str]) -> Callable[[Any], None]:
    global _output  # noqa: PLW0603 - one output per process, replaced with its stdout
    output = _output = LineOutput(sys.stdout)

    def sink(message: Any) -> None:
        record = message.record
        entry: dict[str, Any] = {
            "ts": record["time"].isoformat(timespec="milliseconds"),
            "level": record["level"].name.lower(),
            "message": record["message"],
            "logger": record["name"],
        }
        entry.update(record["extra"])
        if record["exception"] is not None:
            exc = record["exception"]
            entry["exception"] = f"{exc.type.__name__ if exc.type else ''}: {exc.value}"
            entry["traceback"] = _format_traceback(exc)
        line = redact(orjson.dumps(entry, default=str).decode())
        output.write(line + "\n", urgent=record["level"].no >= _WARNING)

    return sink


def write_in_background() -> None:
    """In a gunicorn worker: JSON lines below warning are written by one thread (see
    log_output.py); warnings and errors still at once."""
    if _output is not None:
        _output.start_background()


def flush() -> None:
    """Write every log line still queued (before an exit that skips atexit)."""
    if _output is not None:
        _output.flush()


def _format_traceback(exc: Any) -> str:
    # Plain traceback text: file, line and code, never the values of local variables.
    return "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))


def _text_sink(redact: Callable[[str], str]) -> Callable[[Any], None]:
    stream = sys.stdout

    def sink(message: Any) -> None:
        stream.write(redact(str(message)))
        stream.flush()

    return sink


class InterceptHandler(logging.Handler):
    """Forward standard-library log records into loguru (the recipe from loguru's docs)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.bind(logger=record.name).opt(depth=6, exception=record.exc_info).log(
            level, record.getMessage()
        )


class GunicornLogger(glogging.Logger):
    """gunicorn's error log through loguru; its access log stays off (the app logs requests)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for std_logger in (self.error_log, self.access_log):
            std_logger.handlers = [InterceptHandler()]
            std_logger.propagate = False
        self.access_log.disabled = True
