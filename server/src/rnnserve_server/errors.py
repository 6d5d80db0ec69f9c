"""Domain errors raised by the session layer.

Each carries a sentence a person can act on. ``api/status.py`` is the one place that turns
them into gRPC status codes; nothing below the api/ edge imports grpc.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base class: ``str(error)`` is the message sent to the client; ``session_id`` (when the
    error is about one session) goes into the status details (``api/status.py``)."""

    def __init__(self, message: str, *, session_id: str | None = None) -> None:
        super().__init__(message)
        self.session_id = session_id


class SessionNotFoundError(DomainError):
    """No session has this id (maps to NOT_FOUND)."""


class SessionExistsError(DomainError):
    """The id is taken (maps to ALREADY_EXISTS)."""


class InvalidArgumentError(DomainError):
    """A request field is malformed; the message names the field and why (INVALID_ARGUMENT).

    ``field`` is the field's path (``config.hidden_size``) when the raise site knows it
    better than the message's first word (see ``status.field_of``).
    """

    def __init__(
        self, message: str, *, field: str | None = None, session_id: str | None = None
    ) -> None:
        super().__init__(message, session_id=session_id)
        self.field = field


class LimitExceededError(DomainError):
    """A server limit would be exceeded; the message names the setting (RESOURCE_EXHAUSTED).

    ``setting`` is the limit's Settings name (``max_sessions``), ``limit`` its value and
    ``value`` what the request needed, for the status details.
    """

    def __init__(
        self,
        message: str,
        *,
        setting: str | None = None,
        limit: int | None = None,
        value: int | None = None,
        session_id: str | None = None,
    ) -> None:
        super().__init__(message, session_id=session_id)
        self.setting = setting
        self.limit = limit
        self.value = value


class JobNotFoundError(DomainError):
    """The session has no job of that name (maps to NOT_FOUND)."""


class NotSupportedError(DomainError):
    """This server's mode can't do it (FAILED_PRECONDITION)."""


class SessionBusyError(DomainError):
    """The session is training or otherwise can't take this call now (FAILED_PRECONDITION)."""


class SessionBrokenError(DomainError):
    """The session could not be loaded: FAILED_PRECONDITION when its checkpoint is intact but
    not loadable here (over this server's limits), DATA_LOSS (``damaged``) when the checkpoint
    is unreadable or damaged."""

    def __init__(
        self, message: str, *, session_id: str | None = None, damaged: bool = True
    ) -> None:
        super().__init__(message, session_id=session_id)
        self.damaged = damaged


class UnauthenticatedError(DomainError):
    """No bearer token, or one the server does not accept (UNAUTHENTICATED)."""


class ShuttingDownError(DomainError):
    """The server is stopping and takes no new work (UNAVAILABLE)."""


class OwnerUnavailableError(DomainError):
    """Cluster mode: the replica that owns the session did not answer a forwarded call
    (UNAVAILABLE; ``retry_seconds`` goes into RetryInfo)."""

    def __init__(self, message: str, *, session_id: str, retry_seconds: float) -> None:
        super().__init__(message, session_id=session_id)
        self.retry_seconds = retry_seconds


class NewerFormatError(DomainError):
    """Cluster mode (a rolling upgrade): the session's checkpoint is of a newer format than
    this replica reads, so a newer replica must serve it (UNAVAILABLE)."""


class StorageError(DomainError):
    """A change could not be saved to the data directory, so it was not made or not
    acknowledged (UNAVAILABLE; the message says what the operator must fix)."""


class StorageFullError(StorageError):
    """As StorageError, because the data directory's disk is full (RESOURCE_EXHAUSTED)."""


class LeaseLostError(StorageError):
    """Cluster mode: a change could not be kept because another replica owns the session now:
    this replica lost its lease while the call ran (it was paused, or cut off from Redis, past
    the lease TTL), so its write was refused (ABORTED: retry, the call goes to the new owner).
    """

    @classmethod
    def moved(cls, session_id: str) -> LeaseLostError:
        """The error for ``session_id``, with the sentence a caller sees."""
        return cls(
            f"session {session_id!r} moved to another replica while this call ran: the "
            "replica running it lost the session's lease (it was paused or cut off from "
            "Redis for longer than the lease), so what it did after that is not kept; retry "
            "the call (with until_step it never trains past its target)",
            session_id=session_id,
        )


class CheckpointError(Exception):
    """A checkpoint file could not be read or written; the message says which file and why.

    ``public`` is the sentence a client may see (no paths, no exception text): the message
    itself goes only to the server log. ``damaged`` is False when the file is intact but this
    server refuses it (its model is over the limits): not a data loss.
    """

    def __init__(
        self,
        message: str,
        public: str = "its checkpoint could not be read",
        *,
        damaged: bool = True,
    ) -> None:
        super().__init__(message)
        self.public = public
        self.damaged = damaged


class CheckpointTooNewError(CheckpointError):
    """The checkpoint is of a newer format version than this server reads: not damaged, and
    not BROKEN either (a newer server reads it)."""

    def __init__(self, message: str, public: str, *, version: int) -> None:
        super().__init__(message, public, damaged=False)
        self.version = version
