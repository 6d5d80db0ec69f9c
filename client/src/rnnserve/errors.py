# ruff: noqa: N818  # the names are the agreed API (INTERFACES.md), without an Error suffix
"""Typed exceptions for the gRPC status codes rnnserve returns.

Every failed call raises a subclass of :class:`RnnServeError`; ``.code`` is the
:class:`grpc.StatusCode` (``None`` for errors found before any call was made) and
``.details`` the server's sentence saying what to fix::

    try:
        client.session("nope").info()
    except SessionNotFound as e:
        print(e.details)
"""

from __future__ import annotations

import grpc

__all__ = [
    "InvalidArgument",
    "LimitExceeded",
    "PermissionDenied",
    "RnnServeError",
    "ServerUnavailable",
    "SessionBusy",
    "SessionExists",
    "SessionNotFound",
    "Timeout",
    "TrainingDiverged",
    "Unauthenticated",
    "error_from_code",
    "error_from_rpc",
]


class RnnServeError(Exception):
    """Base of every error the client raises; ``code`` and ``details`` come from the server."""

    default_code: grpc.StatusCode | None = None

    def __init__(self, details: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(details)
        self.details = details
        self.code = code if code is not None else self.default_code

    @property
    def code_name(self) -> str:
        """The status code's name (``NOT_FOUND``), or ``CLIENT`` for a client-side error."""
        return self.code.name if self.code is not None else "CLIENT"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.details!r}, code={self.code_name})"


class SessionNotFound(RnnServeError):
    """NOT_FOUND: no session has that id."""

    default_code = grpc.StatusCode.NOT_FOUND


class SessionExists(RnnServeError):
    """ALREADY_EXISTS: the session id is taken."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class SessionBusy(RnnServeError):
    """FAILED_PRECONDITION: the session is training (or otherwise not in a state to do this)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidArgument(RnnServeError, ValueError):
    """INVALID_ARGUMENT: a field is wrong; the details name it and say why."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class LimitExceeded(RnnServeError):
    """RESOURCE_EXHAUSTED: a server limit would be exceeded; the details name the setting."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TrainingDiverged(RnnServeError):
    """ABORTED: loss or gradients were not finite; the update was not applied."""

    default_code = grpc.StatusCode.ABORTED


class Unauthenticated(RnnServeError):
    """UNAUTHENTICATED: no token, or a wrong one (``token=`` / ``RNNSERVE_TOKEN``)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(RnnServeError):
    """PERMISSION_DENIED: the token is valid but not allowed to do this."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class ServerUnavailable(RnnServeError, ConnectionError):
    """UNAVAILABLE: the server cannot be reached, or is shutting down."""

    default_code = grpc.StatusCode.UNAVAILABLE


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
        TrainingDiverged,
        Unauthenticated,
        PermissionDenied,
        ServerUnavailable,
        Timeout,
    )
    if cls.default_code is not None
}


def error_from_code(code: grpc.StatusCode | None, details: str | None) -> RnnServeError:
    """The exception for a status code: the subclass mapped to it, else RnnServeError."""
    cls = _BY_CODE.get(code, RnnServeError) if code is not None else RnnServeError
    text = details or (code.name if code is not None else "unknown error")
    return cls(text, code)


def error_from_rpc(error: grpc.RpcError) -> RnnServeError:
    """Translate a grpc.RpcError raised by a call into the matching RnnServeError."""
    code = error.code() if callable(getattr(error, "code", None)) else None
    details = error.details() if callable(getattr(error, "details", None)) else None
    if code is None:  # an RpcError that is not a Call: should not happen, keep the text
        return RnnServeError(str(error) or "gRPC call failed", grpc.StatusCode.UNKNOWN)
    return error_from_code(code, details)
