"""Domain errors raised by the session layer.

Each carries a sentence a person can act on. ``service.py`` is the one place that turns them
into gRPC status codes; nothing below it imports grpc.
"""

from __future__ import annotations


class DomainError(Exception):
    """Base class: ``str(error)`` is the message sent to the client."""


class SessionNotFoundError(DomainError):
    """No session has this id (maps to NOT_FOUND)."""


class SessionExistsError(DomainError):
    """The id is taken (maps to ALREADY_EXISTS)."""


class InvalidArgumentError(DomainError):
    """A request field is malformed; the message names the field and why (INVALID_ARGUMENT)."""


class LimitExceededError(DomainError):
    """A server limit would be exceeded; the message names the setting (RESOURCE_EXHAUSTED)."""


class SessionBusyError(DomainError):
    """The session is training or otherwise can't take this call now (FAILED_PRECONDITION)."""


class SessionBrokenError(DomainError):
    """The session's checkpoint could not be read (FAILED_PRECONDITION)."""


class ShuttingDownError(DomainError):
    """The server is stopping and takes no new work (UNAVAILABLE)."""


class StorageError(DomainError):
    """A change could not be saved to the data directory, so it was not made or not
    acknowledged (UNAVAILABLE; the message says what the operator must fix)."""


class StorageFullError(StorageError):
    """As StorageError, because the data directory's disk is full (RESOURCE_EXHAUSTED)."""


class CheckpointError(Exception):
    """A checkpoint file could not be read or written; the message says which file and why.

    ``public`` is the sentence a client may see (no paths, no exception text): the message
    itself goes only to the server log.
    """

    def __init__(self, message: str, public: str = "its checkpoint could not be read") -> None:
        super().__init__(message)
        self.public = public
