"""structlog set-up: called once at start-up, JSON lines unless stderr is a terminal.

Request-scoped fields (method, session_id) are bound through ``structlog.contextvars`` so every
line an RPC logs carries them; the logging interceptor writes one canonical ``rpc`` line per call.
Tokens are never bound or logged.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR

_configured = False


def configure(log_format: str = "auto", level: str = "info") -> None:
    """Configure structlog for the process. Later calls are no-ops."""
    global _configured
    if _configured:
        return
    _configured = True
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(name: str) -> Any:
    """A lazy structlog logger tagged with ``logger_name=name`` (bound after configure())."""
    return structlog.get_logger(logger_name=name)
