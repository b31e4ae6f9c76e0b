"""Logging set-up: one line per event, plain or JSON (json.dumps, so quotes in messages stay valid).

Greengrass captures the component's stdout/stderr into its log file, so every line must read on
its own: time, level, logger, the model and version it concerns (if any), then the message.
Model and version come from context variables set with model_context() around a request or a
model load, so code that logs doesn't have to pass them along (MLServer does the same).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

# Context variables are per thread / per contextvars.Context, not shared state: each gRPC call and
# each model-loader task sees only what was set around it.
_model: contextvars.ContextVar[str | None] = contextvars.ContextVar("edge_agent_log_model", default=None)
_version: contextvars.ContextVar[str | None] = contextvars.ContextVar("edge_agent_log_version", default=None)


@contextmanager
def model_context(model: str | None, version: str | None = None) -> Iterator[None]:
    """Label every log line inside the block with model (and version); None leaves things as they are.

    >>> with model_context("bottle", "3"):
    ...     log.info("model loaded")   # → ... [model=bottle version=3]: model loaded
    """
    if model is None:
        yield
        return
    tokens = (_model.set(model), _version.set(version))
    try:
        yield
    finally:
        _version.reset(tokens[1])
        _model.reset(tokens[0])


def current_model() -> tuple[str | None, str | None]:
    return _model.get(), _version.get()


class ContextFilter(logging.Filter):
    """Copies the model context onto each record (an explicit extra={"model": ...} wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        model, version = current_model()
        if getattr(record, "model", None) is None:
            record.model = model
        if getattr(record, "version", None) is None:
            record.version = version
        return True


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class PlainFormatter(logging.Formatter):
    """`2026-01-02T03:04:05.678Z INFO agent.core.lifecycle [model=bottle version=3]: model bottle RUNNING ...`"""

    def format(self, record: logging.LogRecord) -> str:
        context = ""
        model, version = getattr(record, "model", None), getattr(record, "version", None)
        if model:
            context = f" [model={model}" + (f" version={version}]" if version else "]")
        line = f"{_timestamp(record)} {record.levelname} {record.name}{context}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the traceback (with its chained causes) stays inside the object."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("model", "version"):
            value = getattr(record, key, None)
            if value:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure(level: str, fmt: str, stream: TextIO | None = None) -> logging.Handler:
    """Send all logging to stdout (or `stream`) as plain lines or JSON; returns the handler."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return handler
