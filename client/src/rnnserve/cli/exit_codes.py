"""Exit codes, and the one table that maps library exceptions to them (``ERRORS``)."""

from __future__ import annotations

import re

from rnnserve.errors import (
    InvalidArgument,
    LimitExceeded,
    PermissionDenied,
    RnnServeError,
    ServerUnavailable,
    SessionBroken,
    SessionBusy,
    SessionExists,
    SessionNotFound,
    Timeout,
    TrainingDiverged,
    Unauthenticated,
)

PROG = "rnnserve"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_UNAVAILABLE = 5
EXIT_INVALID = 6
EXIT_LIMIT = 7
EXIT_DIVERGED = 8
EXIT_TIMEOUT = 9
EXIT_AUTH = 10
EXIT_BROKEN = 11
EXIT_INTERRUPTED = 130

# (exception type, exit code, label) in match order: subclasses before RnnServeError.
ERRORS: list[tuple[type[RnnServeError], int, str]] = [
    (SessionNotFound, EXIT_NOT_FOUND, "not found"),
    (SessionExists, EXIT_CONFLICT, "already exists"),
    (SessionBusy, EXIT_CONFLICT, "busy"),
    (SessionBroken, EXIT_BROKEN, "broken"),
    (ServerUnavailable, EXIT_UNAVAILABLE, "unavailable"),
    (InvalidArgument, EXIT_INVALID, "invalid argument"),
    (LimitExceeded, EXIT_LIMIT, "limit exceeded"),
    (TrainingDiverged, EXIT_DIVERGED, "training diverged"),
    (Timeout, EXIT_TIMEOUT, "timed out"),
    (Unauthenticated, EXIT_AUTH, "unauthenticated"),
    (PermissionDenied, EXIT_AUTH, "permission denied"),
    (RnnServeError, EXIT_ERROR, "error"),
]

EXIT_CODES_HELP = """\
exit codes:
  0    success (health: the server is SERVING)
  1    any other error
  2    usage error (bad flags, no input text or an empty file, an input file that does
       not exist, is a directory or is not UTF-8 text)
  3    session not found
  4    conflict: the session id is taken, or the session is busy training
  5    server unavailable, not SERVING, or shutting down
  6    invalid argument (the message names the field)
  7    a server limit would be exceeded (the message names the setting)
  8    training diverged: loss not finite (update not applied) or above 2 ln V for a
       whole report window (lower it: rnnserve set ID --learning-rate 1e-3)
  9    timed out (raise --timeout)
  10   unauthenticated or permission denied (--token / RNNSERVE_TOKEN)
  11   the session is broken: its checkpoint could not be loaded (rnnserve show ID
       shows why); fix or restore the file, or rnnserve delete ID
  130  interrupted with Ctrl-C (a running train is cancelled cleanly first)
"""


class UsageError(Exception):
    """A mistake in the command line found after parsing: exit code 2."""


def _error_line(error: RnnServeError, address: str) -> tuple[int, str]:
    for cls, code, label in ERRORS:
        if isinstance(error, cls):
            details = " ".join(error.details.split())
            if cls is ServerUnavailable:
                details = _unreachable(details, address)
            return code, f"{PROG}: {label}: {details}"
    return EXIT_ERROR, f"{PROG}: error: {error}"  # pragma: no cover - RnnServeError matches


# gRPC names the address it resolved ("ipv6:%5B::1%5D:50999: "), not the one the user typed.
_RESOLVED = re.compile(r"\b(?:ipv4|ipv6|unix|unix-abstract):\S+?:\s")
# gRPC's own words when no connection could be made at all (nothing listens, no such host).
_NO_CONNECTION = ("failed to connect to all addresses", "DNS resolution failed", "errors resolving")


def _unreachable(details: str, address: str) -> str:
    """An UNAVAILABLE error in the address's own words, with a hint when nothing answered."""
    details = _RESOLVED.sub("", details)
    if not any(words in details for words in _NO_CONNECTION):
        return f"cannot reach the server at {address}: {details}"
    cause = details.rsplit(": ", 1)[-1].strip(" []")
    cause = cause[:1].lower() + cause[1:]
    return f"cannot reach the server at {address} ({cause}); {start_hint(address)}"


def start_hint(address: str) -> str:
    """What to do when no server answers at ``address``."""
    return (
        f"is one running there? Start one with `make run` (in the repository) or "
        f"`rnnserve-server --address {address}`, or give another with --address"
    )
