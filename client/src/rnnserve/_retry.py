"""Retrying by idempotency, shared by the sync and asyncio clients.

A Train or Step with ``until_step`` names the step it trains to, so sending it again never
trains past it: such a call is retried whatever cut it off (a replica that died or froze, a
proxy's reset, a stream that ended without its final message, a deadline on a hop), with
backoff, for a bounded time. What decides is the status code and the server's ErrorInfo
reason, never the text. A Train without ``until_step`` cut off the same way raises
:class:`~rnnserve.errors.ConnectionLost`, which names the step to retry toward.
"""

from __future__ import annotations

import time

import grpc

from rnnserve.errors import ConnectionLost, RnnServeError
from rnnserve.v1 import rnn_service_pb2 as pb

DEFAULT_RETRY_FOR = 60.0  # seconds of retries since the last progress before giving up
FIRST_DELAY = 0.1  # seconds before the first retry; doubled after each failed one
MAX_DELAY = 2.0

_Code = grpc.StatusCode
# Reasons the server gives when the same call may succeed later: it is stopping, can't save
# now, or the session is moving between replicas.
_TRANSIENT_REASONS = {"SHUTTING_DOWN", "STORAGE_UNAVAILABLE", "OWNER_UNAVAILABLE", "LEASE_LOST"}
# Codes of failures that carry no reason of the server's: the transport's (a connection
# refused or reset, a proxy's RST_STREAM, a deadline).
_TRANSIENT_CODES = {
    _Code.UNAVAILABLE,
    _Code.INTERNAL,
    _Code.UNKNOWN,
    _Code.DEADLINE_EXCEEDED,
    _Code.CANCELLED,
}
# What happened to a call cut off mid-call, by the reason that ended it (None: the
# transport's failure); a replica that failed mid-call may have changed the session.
_CUT_OFF: dict[str | None, str] = {
    None: "the connection to the replica was lost mid-call",
    "OWNER_UNAVAILABLE": "the connection to the replica was lost mid-call",
    "LEASE_LOST": "the replica running the call lost the session to another replica mid-call",
}


def worth_retrying(
    error: RnnServeError, *, while_busy: bool = False, reasons: frozenset[str] = frozenset()
) -> bool:
    """True if sending the same idempotent call again may succeed: anything but the server's
    answer to the request itself (not found, invalid, diverged, a limit, auth, a server
    fault), which a retry would only repeat. ``while_busy``: SESSION_BUSY too (a Train of the
    session's previous owner may still be stopping); ``reasons``: more reasons to retry."""
    if isinstance(error, ConnectionLost):
        return True
    if error.reason is not None:
        return (
            error.reason in _TRANSIENT_REASONS
            or error.reason in reasons
            or (while_busy and error.reason == "SESSION_BUSY")
        )
    return error.code in _TRANSIENT_CODES


class Retries:
    """The retries of one idempotent call: how long to wait before each (exponential backoff,
    at least the server's RetryInfo delay) and for how long in all: ``retry_for`` seconds
    since the last try that made progress."""

    def __init__(
        self, retry_for: float, *, while_busy: bool = False, reasons: frozenset[str] = frozenset()
    ) -> None:
        self.retry_for = retry_for
        self.while_busy = while_busy
        self.reasons = reasons
        self._next = FIRST_DELAY
        self._give_up_at: float | None = None

    def progressed(self) -> None:
        """A try got somewhere: the next failure starts a new run of retries."""
        self._next = FIRST_DELAY
        self._give_up_at = None

    def delay(self, error: RnnServeError) -> float:
        """Seconds to wait before trying again after ``error``; raises ``error`` itself if it
        is not worth retrying or the time for retries is up."""
        if not worth_retrying(error, while_busy=self.while_busy, reasons=self.reasons):
            raise error
        now = time.monotonic()
        if self._give_up_at is None:
            self._give_up_at = now + self.retry_for
        wait = max(self._next, error.retry_delay or 0.0)
        if now + wait > self._give_up_at:
            raise error
        self._next = min(self._next * 2, MAX_DELAY)
        return wait


def cut_off(
    error: RnnServeError | None,
    request: pb.TrainRequest,
    last: pb.TrainResponse | None,
) -> RnnServeError | None:
    """What a Train stream raises when it ended before its final message, ``error`` (None: it
    just stopped) having ended it: a :class:`ConnectionLost` if the call may have changed
    the session (the connection broke or the replica failed mid-call), else ``error`` as is
    (the server refused the call). ``last`` is the last message the stream got."""
    if error is not None:
        if error.reason is not None:
            if error.reason not in _CUT_OFF:
                return error
        elif error.code is _Code.UNAVAILABLE and last is None:
            return error  # no answer at all: maybe never connected
        elif error.code not in (_Code.INTERNAL, _Code.UNKNOWN, _Code.UNAVAILABLE):
            return error
    target: int | None = None
    if request.HasField("until_step"):
        target = request.until_step
    elif last is not None and request.steps > 0:
        target = last.step - last.steps_done + request.steps
    return ConnectionLost(_CUT_OFF[error.reason if error is not None else None], target, error)
