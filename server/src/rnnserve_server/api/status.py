"""Domain errors -> google.rpc.Status with details (AIP-193): the one place errors become codes.

Every failed call carries, besides its code and sentence, a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer with an ``ErrorInfo`` (a stable ``reason`` from the proto's
``ErrorReason`` enum without its prefix, domain ``rnnserve.v1``, metadata such as the session
id or the limit) and, where they apply, ``BadRequest`` (the field), ``QuotaFailure`` (the limit)
and ``RetryInfo`` (when a retry can help). Clients branch on the reason, not on the code alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc import aio
from grpc_status import rpc_status
from rnnserve.v1 import rnn_service_pb2 as pb

from rnnserve_server.engine.model_config import DivergedError, EngineError
from rnnserve_server.engine.vocab import UnknownCharactersError
from rnnserve_server.errors import (
    CheckpointError,
    DomainError,
    InvalidArgumentError,
    JobNotFoundError,
    LeaseLostError,
    LimitExceededError,
    NewerFormatError,
    NotSupportedError,
    OwnerUnavailableError,
    SessionBrokenError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    ShuttingDownError,
    StorageError,
    StorageFullError,
    UnauthenticatedError,
)
from rnnserve_server.logs import get_logger

log = get_logger("rnnserve.status")

DOMAIN = "rnnserve.v1"
# RetryInfo delays: how long a client should wait before the same call can succeed.
RETRY_SHUTTING_DOWN_S = 1.0  # another instance, or this one restarted
RETRY_STORAGE_S = 5.0  # an operator must act on the data directory
RETRY_STORAGE_FULL_S = 30.0  # an operator must free space

_PREFIX = "ERROR_REASON_"
# The reason strings the proto documents (ErrorReason names without the prefix).
REASONS = frozenset(name.removeprefix(_PREFIX) for name in pb.ErrorReason.keys()[1:])


@dataclass
class Problem:
    """What a failed call reports: the code, the sentence and the details' contents."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)
    field_path: str | None = None  # BadRequest: the request field at fault
    quota: LimitExceededError | None = None  # QuotaFailure: the limit
    retry_seconds: float | None = None  # RetryInfo


def _request_fields() -> tuple[frozenset[str], frozenset[str]]:
    """(fields of every request message, fields of SessionConfig): the names a message's
    first word can be."""
    top: set[str] = set()
    for name, message in pb.DESCRIPTOR.message_types_by_name.items():
        if name.endswith("Request"):
            top.update(f.name for f in message.fields)
    config = frozenset(f.name for f in pb.SessionConfig.DESCRIPTOR.fields)
    return frozenset(top), config


_TOP_FIELDS, _CONFIG_FIELDS = _request_fields()
_LEADING = re.compile(r"([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*)(?=[\s:]|$)")


def field_of(message: str) -> str | None:
    """The request field an INVALID_ARGUMENT sentence is about: our sentences start with it
    (``config.seed must be >= 0``, ``hidden_size must be ...``, ``text: ...``)."""
    match = _LEADING.match(message)
    if match is None:
        return None
    word = match.group(1)
    if word.startswith("config.") and word.removeprefix("config.") in _CONFIG_FIELDS:
        return word
    if word in _TOP_FIELDS:
        return word
    if word in _CONFIG_FIELDS:  # the engine names config fields without the prefix
        return "config." + word
    return None


def _session_id(exc: BaseException) -> str | None:
    explicit = exc.session_id if isinstance(exc, DomainError) else None
    bound = structlog.contextvars.get_contextvars().get("session_id")
    return explicit or (str(bound) if bound else None)


def problem_for(exc: BaseException) -> Problem | None:
    """The Problem for a known exception; None for an unexpected one (a server fault)."""
    code = grpc.StatusCode
    message = str(exc)
    if isinstance(exc, CheckpointError):  # the message has paths: the log gets it, not clients
        log.error("checkpoint_error", error=message)
        return Problem(code.INTERNAL, "INTERNAL", f"{exc.public} (the server log has the details)")
    if isinstance(exc, DivergedError):
        sid = _session_id(exc) or "SESSION"
        message = (
            f"training diverged: {exc}; the update was not applied and the session keeps its "
            "last good weights; the learning rate is probably too high: lower it with "
            f"`rnnserve set {sid} --learning-rate 1e-3` (UpdateSession), or try one on a "
            f"copy with `rnnserve fork {sid} NEW_ID --learning-rate 1e-3`"
        )
        return Problem(code.FAILED_PRECONDITION, "TRAINING_DIVERGED", message)
    if isinstance(exc, (InvalidArgumentError, UnknownCharactersError, EngineError)):
        where = exc.field if isinstance(exc, InvalidArgumentError) else None
        if isinstance(exc, UnknownCharactersError):
            where = "text"
        where = where or field_of(message)
        return Problem(code.INVALID_ARGUMENT, "FIELD_INVALID", message, field_path=where)
    if isinstance(exc, LimitExceededError):
        return Problem(code.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED", message, quota=exc)
    if isinstance(exc, OwnerUnavailableError):
        return Problem(
            code.UNAVAILABLE, "OWNER_UNAVAILABLE", message, retry_seconds=exc.retry_seconds
        )
    table: list[tuple[type[BaseException], grpc.StatusCode, str, float | None]] = [
        (SessionNotFoundError, code.NOT_FOUND, "SESSION_NOT_FOUND", None),
        (JobNotFoundError, code.NOT_FOUND, "JOB_NOT_FOUND", None),
        (NotSupportedError, code.FAILED_PRECONDITION, "NOT_SUPPORTED", None),
        (SessionExistsError, code.ALREADY_EXISTS, "SESSION_EXISTS", None),
        (SessionBusyError, code.FAILED_PRECONDITION, "SESSION_BUSY", None),
        (LeaseLostError, code.ABORTED, "LEASE_LOST", None),
        (ShuttingDownError, code.UNAVAILABLE, "SHUTTING_DOWN", RETRY_SHUTTING_DOWN_S),
        (NewerFormatError, code.UNAVAILABLE, "NEWER_FORMAT", RETRY_STORAGE_S),
        (StorageFullError, code.RESOURCE_EXHAUSTED, "STORAGE_FULL", RETRY_STORAGE_FULL_S),
        (StorageError, code.UNAVAILABLE, "STORAGE_UNAVAILABLE", RETRY_STORAGE_S),
        (UnauthenticatedError, code.UNAUTHENTICATED, "UNAUTHENTICATED", None),
    ]
    if isinstance(exc, SessionBrokenError):
        if exc.damaged:
            return Problem(code.DATA_LOSS, "CHECKPOINT_DAMAGED", message)
        return Problem(code.FAILED_PRECONDITION, "SESSION_BROKEN", message)
    for kind, status_code, reason, retry in table:
        if isinstance(exc, kind):
            return Problem(status_code, reason, message, retry_seconds=retry)
    return None


def internal_problem(exc: BaseException) -> Problem:
    """A server fault: INTERNAL naming only the exception's type (the log has the rest)."""
    return Problem(
        grpc.StatusCode.INTERNAL,
        "INTERNAL",
        f"internal server error ({type(exc).__name__}); the server log has the details",
    )


def _details(problem: Problem, session_id: str | None) -> Iterator[Any]:
    metadata = dict(problem.metadata)
    if session_id:
        metadata["session_id"] = session_id
    if problem.field_path:
        metadata["field"] = problem.field_path
    quota = problem.quota
    if quota is not None and quota.setting:
        metadata["limit"] = quota.setting
        if quota.limit is not None:
            metadata["limit_value"] = str(quota.limit)
        if quota.value is not None:
            metadata["value"] = str(quota.value)
    yield error_details_pb2.ErrorInfo(reason=problem.reason, domain=DOMAIN, metadata=metadata)
    if problem.field_path:
        yield error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=problem.field_path, description=problem.message, reason=problem.reason
                )
            ]
        )
    if quota is not None:
        violation = error_details_pb2.QuotaFailure.Violation(
            subject=f"session:{session_id}" if session_id else "server",
            description=problem.message,
        )
        if quota.setting:
            violation.quota_id = quota.setting
        if quota.limit is not None:
            violation.quota_value = quota.limit
        yield error_details_pb2.QuotaFailure(violations=[violation])
    if problem.retry_seconds is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(problem.retry_seconds * 1e9))
        yield error_details_pb2.RetryInfo(retry_delay=delay)


def to_status(problem: Problem, session_id: str | None = None) -> status_pb2.Status:
    """The google.rpc.Status for a Problem, details packed in order: ErrorInfo first."""
    details = []
    for detail in _details(problem, session_id):
        packed = any_pb2.Any()
        packed.Pack(detail)
        details.append(packed)
    code: int = problem.code.value[0]
    return status_pb2.Status(code=code, message=problem.message, details=details)


def status_for(exc: BaseException) -> status_pb2.Status:
    """The google.rpc.Status for any exception (an unexpected one is logged: INTERNAL)."""
    problem = problem_for(exc)
    if problem is None:
        log.exception("internal_error", error=repr(exc))
        problem = internal_problem(exc)
    return to_status(problem, _session_id(exc))


async def abort(context: aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """End the call with ``exc``'s status and details (raises grpc.aio.AbortError)."""
    # What context.abort_with_status does (experimental, and not in the type stubs).
    wire = rpc_status.to_status(status_for(exc))
    await context.abort(wire.code, wire.details, wire.trailing_metadata)
