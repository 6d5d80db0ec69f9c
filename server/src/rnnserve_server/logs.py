"""structlog set-up: called once at start-up, JSON lines unless stderr is a terminal.

Request-scoped fields (method, session_id) are bound through ``structlog.contextvars`` so every
line an RPC logs carries them; the observing interceptor writes one canonical ``rpc`` line per
call. Tokens are never bound or logged.

structlog's documented pieces: ``TimeStamper`` and ``JSONRenderer`` (or ``ConsoleRenderer`` on a
terminal) for our own lines, and a ``structlog.stdlib.ProcessorFormatter`` on the root logging
handler, so what grpc, asyncio or any library logs through the standard ``logging`` module comes
out through the same processors, as the same JSON lines (``logger_name`` says whose).

Every RPC pays for its ``rpc`` line, so our own lines do not go through ``logging``: structlog
renders them itself (orjson: ~3.5 us less per line than the standard json encoder, measured
with bench/log_line.py) and a ``BytesLogger`` writes each with one ``write`` + ``flush`` on
stderr's binary buffer (no line waits in a buffer: tests and log shippers read the log live).
orjson writes compact JSON (``"key":"value"``): match log lines by parsing them, not as text.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR

_configured = False


def _fallback(obj: Any) -> Any:
    """What JSON cannot represent becomes its ``__structlog__()`` or ``repr()``, as with
    structlog's default JSONRenderer."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


def _dumps(event_dict: Any, **_: Any) -> bytes:
    """JSONRenderer's serializer: orjson, numpy scalars as numbers (JSONRenderer passes its own
    ``default=``; ours is built in)."""
    return orjson.dumps(event_dict, default=_fallback, option=orjson.OPT_SERIALIZE_NUMPY)


def _dumps_text(event_dict: Any, **_: Any) -> str:
    """The same JSON as text, for the standard logging handler (a Formatter returns str)."""
    return _dumps(event_dict).decode("utf-8")


def _logger_name(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> Any:
    """``logger_name`` of a standard logging record (``grpc._cython.cygrpc``, ``asyncio``), the
    field our own lines carry."""
    record = event_dict.get("_record")
    if record is not None:
        event_dict["logger_name"] = record.name
    return event_dict


def _renderer(use_json: bool, serializer: Any) -> Any:
    if use_json:
        return structlog.processors.JSONRenderer(serializer=serializer)
    return structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())


def configure(log_format: str = "auto", level: str = "info") -> None:
    """Configure structlog and the standard ``logging`` root for the process. Later calls
    are no-ops."""
    global _configured
    if _configured:
        return
    _configured = True
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    threshold = _LEVELS.get(level, logging.INFO)
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    shared: list[Any] = [structlog.processors.add_log_level, timestamper]
    tail: list[Any] = [structlog.processors.format_exc_info] if use_json else []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            *tail,
            _renderer(use_json, _dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        logger_factory=(
            structlog.BytesLoggerFactory(file=sys.stderr.buffer)
            if use_json
            else structlog.WriteLoggerFactory(file=sys.stderr)
        ),
        cache_logger_on_first_use=True,
    )
    # Lines from the standard logging module (grpc's, asyncio's): same fields, same renderer.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[_logger_name, *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *tail,
            _renderer(use_json, _dumps_text),
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)


def get_logger(name: str) -> Any:
    """A lazy structlog logger tagged with ``logger_name=name`` (bound after configure())."""
    return structlog.get_logger(logger_name=name)
