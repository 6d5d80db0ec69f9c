"""structlog set-up: called once at start-up, JSON lines unless stderr is a terminal.

Request-scoped fields (method, session_id) are bound through ``structlog.contextvars`` so every
line an RPC logs carries them; the observing interceptor writes one canonical ``rpc`` line per
call. Tokens are never bound or logged.

Every RPC pays for its ``rpc`` line, so the JSON path is kept cheap: a short processor chain, a
timestamp formatted from a per-second cached prefix, one reused ``json.JSONEncoder`` (the same
text as before, ``"key": "value"``, which log queries and tests match on; orjson would be ~2 us
faster per line but writes ``"key":"value"``), and one ``write`` + ``flush`` of one bytes object
per line on stderr's binary buffer (no line waits in a buffer: tests and log shippers read the
log live).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR

_configured = False


class _UtcTimestamp:
    """``timestamp`` as ISO 8601 UTC with microseconds (``2026-11-29T23:02:04.513114Z``, what
    ``TimeStamper(fmt="iso", utc=True)`` writes); the part up to the second is formatted once
    per second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, logger: Any, name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        second = int(now)
        if second != self._second:  # benign race between threads: both compute the same text
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event_dict


def _fallback(obj: Any) -> Any:
    """What JSON cannot represent becomes its ``__structlog__()`` or ``repr()``, as with
    structlog's JSONRenderer."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


# json.dumps(obj, default=...) builds a new encoder per call (~1 us of its ~3 us); the C
# encoder behind one reused instance is thread-safe (it keeps no state between calls).
_encode = json.JSONEncoder(default=_fallback).encode


def _render_json(logger: Any, name: str, event_dict: dict[str, Any]) -> bytes:
    """One JSON object as ASCII bytes, exactly what structlog's JSONRenderer wrote (no
    newline: the logger adds it)."""
    return _encode(event_dict).encode("ascii")


def configure(log_format: str = "auto", level: str = "info") -> None:
    """Configure structlog for the process. Later calls are no-ops."""
    global _configured
    if _configured:
        return
    _configured = True
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    logger_factory: Any
    if use_json:
        processors += [_UtcTimestamp(), structlog.processors.format_exc_info, _render_json]
        # BytesLogger writes message + b"\n" and flushes, under a lock: one write per line.
        logger_factory = structlog.BytesLoggerFactory(file=sys.stderr.buffer)
    else:
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()),
        ]
        logger_factory = structlog.PrintLoggerFactory(file=sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=logger_factory,
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    """A lazy structlog logger tagged with ``logger_name=name`` (bound after configure())."""
    return structlog.get_logger(logger_name=name)
