# ruff: noqa: N818  # the names are the agreed API (INTERFACES.md), without an Error suffix
"""Typed exceptions for the errors rnnserve returns.

Every failed call raises a subclass of :class:`RnnServeError`; ``.code`` is the
:class:`grpc.StatusCode` (``None`` for errors found before any call was made) and
``.details`` the server's sentence saying what to fix. The server also sends a
``google.rpc.Status`` with details (AIP-193): ``.reason`` is its ErrorInfo reason
(``SESSION_NOT_FOUND``, ...: the proto's ``ErrorReason`` names without the prefix),
``.metadata`` its ErrorInfo metadata (``session_id``, ``limit``, ...), ``.field_violations``
the BadRequest fields and ``.retry_delay`` the RetryInfo delay. The exception class is chosen
by reason first, by code second::

    try:
        client.session("nope").info()
    except SessionNotFound as e:
        print(e.details, e.reason, e.metadata["session_id"])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "ConnectionLost",
    "FieldViolation",
    "InvalidArgument",
    "JobNotFound",
    "LimitExceeded",
    "PermissionDenied",
    "RnnServeError",
    "ServerUnavailable",
    "SessionBroken",
    "SessionBusy",
    "SessionExists",
    "SessionNotFound",
    "Timeout",
    "TrainingDiverged",
    "Unauthenticated",
    "error_from_code",
    "error_from_rpc",
]


DOMAIN = "rnnserve.v1"  # the ErrorInfo domain of rnnserve's reasons
STATUS_DETAILS_KEY = "grpc-status-details-bin"  # the trailer holding the google.rpc.Status


class FieldViolation(NamedTuple):
    """A request field the server refused (google.rpc.BadRequest) and why."""

    field: str
    description: str


class RnnServeError(Exception):
    """Base of every error the client raises; ``code`` and ``details`` come from the server,
    and so do ``reason``, ``metadata``, ``field_violations`` and ``retry_delay`` (seconds)
    when the server sent error details (empty / ``None`` otherwise)."""

    default_code: grpc.StatusCode | None = None

    def __init__(
        self,
        details: str,
        code: grpc.StatusCode | None = None,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(details)
        self.details = details
        self.code = code if code is not None else self.default_code
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations = list(field_violations)
        self.retry_delay = retry_delay

    @property
    def code_name(self) -> str:
        """The status code's name (``NOT_FOUND``), or ``CLIENT`` for a client-side error."""
        return self.code.name if self.code is not None else "CLIENT"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.details!r}, code={self.code_name})"


class SessionNotFound(RnnServeError):
    """NOT_FOUND: no session has that id."""

    default_code = grpc.StatusCode.NOT_FOUND


class JobNotFound(SessionNotFound):
    """NOT_FOUND: the session has no training job of that name."""


class SessionExists(RnnServeError):
    """ALREADY_EXISTS: the session id is taken."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class SessionBusy(RnnServeError):
    """FAILED_PRECONDITION: the session is training (or otherwise not in a state to do this)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class SessionBroken(RnnServeError):
    """The session (state BROKEN) could not be loaded: FAILED_PRECONDITION with reason
    SESSION_BROKEN (over this server's limits; the file is intact), or DATA_LOSS with reason
    CHECKPOINT_DAMAGED (its checkpoint is unreadable or damaged). Delete it or fix the file."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidArgument(RnnServeError, ValueError):
    """INVALID_ARGUMENT: a field is wrong; the details name it and say why."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class LimitExceeded(RnnServeError):
    """RESOURCE_EXHAUSTED: a server limit would be exceeded; the details name the setting."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TrainingDiverged(RnnServeError):
    """FAILED_PRECONDITION, reason TRAINING_DIVERGED: loss or gradients were not finite; the
    update was not applied (lower the learning rate before retrying)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(RnnServeError):
    """UNAUTHENTICATED: no token, or a wrong one (``token=`` / ``RNNSERVE_TOKEN``)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RnnServeError):
    """PERMISSION_DENIED: the token is valid but not allowed to do this."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class ServerUnavailable(RnnServeError, ConnectionError):
    """UNAVAILABLE: the server cannot be reached, or is shutting down."""

    default_code = grpc.StatusCode.UNAVAILABLE


class ConnectionLost(ServerUnavailable):
    """A Train (or Step) was cut off mid-call: the connection to the replica broke (a proxy's
    reset, a dropped connection, a stream that ended without its final message) or the
    replica doing the work failed. The call may or may not have changed the session.

    ``what`` says what happened; ``target_step`` is the step the call was heading for, when
    known: retry with ``until_step=target_step``, which never trains past it
    (``Session.train_to`` does). ``cause`` is the error that ended the call (None: the stream
    just stopped); ``code``, ``reason`` and the other details are its.
    """

    def __init__(self, what: str, target_step: int | None, cause: RnnServeError | None) -> None:
        if target_step is None:
            advice = "check its step (info()) and retry with until_step set to its target"
        else:
            advice = f"retry with until_step={target_step}, which never trains past it"
        super().__init__(
            f"{what}; the session may have been updated; {advice} (Session.train_to retries "
            "for you)",
            cause.code if cause is not None else None,
            reason=cause.reason if cause is not None else None,
            metadata=cause.metadata if cause is not None else None,
            retry_delay=cause.retry_delay if cause is not None else None,
        )
        self.what = what
        self.target_step = target_step
        self.cause = cause


class Timeout(RnnServeError, TimeoutError):
    """DEADLINE_EXCEEDED: the call took longer than its timeout."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


_BY_CODE: dict[grpc.StatusCode, type[RnnServeError]] = {
    cls.default_code: cls
    for cls in (
        SessionNotFound,
        SessionExists,
        SessionBusy,
        InvalidArgument,
        LimitExceeded,
        Unauthenticated,
        PermissionDenied,
        ServerUnavailable,
        Timeout,
    )
    if cls.default_code is not None
}
_BY_CODE[grpc.StatusCode.DATA_LOSS] = SessionBroken
_BY_CODE[grpc.StatusCode.ABORTED] = TrainingDiverged  # servers before the reasons

# ErrorInfo reason (domain rnnserve.v1) -> class; matched before the code.
_BY_REASON: dict[str, type[RnnServeError]] = {
    "SESSION_NOT_FOUND": SessionNotFound,
    "JOB_NOT_FOUND": JobNotFound,
    "SESSION_EXISTS": SessionExists,
    "SESSION_BUSY": SessionBusy,
    "SESSION_BROKEN": SessionBroken,
    "CHECKPOINT_DAMAGED": SessionBroken,
    "TRAINING_DIVERGED": TrainingDiverged,
    "FIELD_INVALID": InvalidArgument,
    "LIMIT_EXCEEDED": LimitExceeded,
    "STORAGE_FULL": LimitExceeded,
    "STORAGE_UNAVAILABLE": ServerUnavailable,
    "SHUTTING_DOWN": ServerUnavailable,
    "OWNER_UNAVAILABLE": ServerUnavailable,
    "NEWER_FORMAT": ServerUnavailable,
    "LEASE_LOST": ServerUnavailable,
    "UNAUTHENTICATED": Unauthenticated,
}


def error_from_code(
    code: grpc.StatusCode | None,
    details: str | None,
    *,
    reason: str | None = None,
    metadata: dict[str, str] | None = None,
    field_violations: Iterable[FieldViolation] = (),
    retry_delay: float | None = None,
) -> RnnServeError:
    """The exception for a reason and status code: the subclass mapped to the reason, else
    to the code, else RnnServeError."""
    cls = _BY_REASON.get(reason or "")
    if cls is None:
        cls = _BY_CODE.get(code, RnnServeError) if code is not None else RnnServeError
    text = details or (code.name if code is not None else "unknown error")
    return cls(
        text,
        code,
        reason=reason,
        metadata=metadata,
        field_violations=field_violations,
        retry_delay=retry_delay,
    )


def status_details(error: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status the server put in the call's trailers, if any (what
    ``grpc_status.rpc_status.from_call`` reads, without its code checks, for sync and aio
    calls alike)."""
    trailers = getattr(error, "trailing_metadata", None)
    try:
        pairs: Any = trailers() if callable(trailers) else None
        for key, value in pairs or ():
            if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
                return status_pb2.Status.FromString(value)
    except Exception:  # undecodable details: fall back to the code
        return None
    return None


def _unpack(status: status_pb2.Status) -> dict[str, Any]:
    """error_from_code's keyword arguments from a google.rpc.Status's details."""
    found: dict[str, Any] = {}
    violations: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == DOMAIN and "reason" not in found:
                found["reason"] = info.reason
                found["metadata"] = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            found["retry_delay"] = retry.retry_delay.ToNanoseconds() / 1e9
    found["field_violations"] = violations
    return found


def error_from_rpc(error: grpc.RpcError) -> RnnServeError:
    """Translate a grpc.RpcError raised by a call into the matching RnnServeError."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = error.details() if callable(getattr(error, "details", None)) else None
    if code is None:  # an RpcError that is not a Call: should not happen, keep the text
        return RnnServeError(str(error) or "gRPC call failed", grpc.StatusCode.UNKNOWN)
    status = status_details(error)
    extra = _unpack(status) if status is not None else {}
    return error_from_code(code, details, **extra)
