"""Request building shared by the sync :class:`rnnserve.Client` and the asyncio
:class:`rnnserve.aio.Client`: the request messages of each call, and the chunked request
streams of the uploads (AppendText, ImportSession). Both clients only send what this builds."""

from __future__ import annotations

import codecs
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import IO, Any, Generic, TypeVar

from google.protobuf import field_mask_pb2

from rnnserve._common import config_changes, create_session_request
from rnnserve.errors import InvalidArgument, RnnServeError
from rnnserve.v1 import rnn_service_pb2 as pb

# 64 Ki characters are at most 256 KiB of UTF-8: far under gRPC's 4 MiB default message limit.
DEFAULT_CHUNK_CHARS = 65536
# Archive chunks sent by ImportSession: 256 KiB, like AppendText's largest, far under the
# 4 MiB message limit.
DEFAULT_CHUNK_BYTES = 256 * 1024

# Text for append_text: a whole string, a text or binary file, or an iterable of chunks.
TextSource = str | bytes | IO[str] | IO[bytes] | Iterable[str] | Iterable[bytes]
# An archive for import_session: a path, the bytes, or a binary file.
ArchiveSource = str | os.PathLike[str] | bytes | IO[bytes]

R = TypeVar("R")

# create_session's arguments that are not SessionConfig fields.
_CREATE_ARGS = ("text", "session_id", "preset", "alphabet", "optimizer", "dtype", "cell")


# ---------------------------------------------------------------------------------------------
# Chunking.


def iter_text_chunks(source: TextSource, chunk_chars: int = DEFAULT_CHUNK_CHARS) -> Iterator[str]:
    """Yield non-empty pieces of ``source`` of at most ``chunk_chars`` characters each.

    ``source`` is a str, bytes (UTF-8), a file object opened in text or binary mode (read
    ``chunk_chars`` at a time, never whole), or an iterable of str or bytes chunks of any size.
    Bytes are decoded incrementally, so a character split across two chunks is kept whole.
    """
    if chunk_chars < 1:
        raise InvalidArgument(f"chunk_chars must be at least 1, got {chunk_chars}")
    decoder = codecs.getincrementaldecoder("utf-8")()

    def pieces() -> Iterator[str | bytes]:
        if isinstance(source, str | bytes | bytearray):
            yield source if isinstance(source, str) else bytes(source)
        elif hasattr(source, "read"):
            read: Callable[[int], str | bytes] = source.read
            while piece := read(chunk_chars):
                yield piece
        else:
            yield from source

    for piece in pieces():
        if isinstance(piece, bytes | bytearray):
            text = decoder.decode(bytes(piece))
        elif isinstance(piece, str):
            text = piece
        else:
            raise TypeError(f"text chunks must be str or bytes, not {type(piece).__name__}")
        for start in range(0, len(text), chunk_chars):
            yield text[start : start + chunk_chars]
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail


def iter_bytes(
    source: str | os.PathLike[str] | bytes | IO[bytes], chunk_bytes: int
) -> Iterator[bytes]:
    """Chunks of at most ``chunk_bytes`` from bytes, a binary file or a file path."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        for i in range(0, len(data), chunk_bytes):
            yield data[i : i + chunk_bytes]
        return
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            yield from iter_bytes(f, chunk_bytes)
        return
    while chunk := source.read(chunk_bytes):
        yield chunk


class Upload(Generic[R]):
    """The request stream of a client-streaming call: the first message carries the session
    id, every message one chunk (at least one message, even for an empty source).

    gRPC reads it in its own thread (sync) or task (asyncio), where an error reading the
    source only cancels the call; :meth:`reraise` hands that error back to the caller."""

    def __init__(
        self,
        chunks: Iterator[Any],
        make: Callable[[bool, Any], R],
        last: Callable[[], R] | None = None,
    ) -> None:
        self._chunks = chunks
        self._make = make  # (first, chunk or None) -> request
        self._last = last  # the message that ends a complete upload, if the call has one
        self.failure: Exception | None = None

    def __iter__(self) -> Iterator[R]:
        first = True
        try:
            for chunk in self._chunks:
                yield self._make(first, chunk)
                first = False
        except Exception as e:  # raised in gRPC's thread or task: hand it back to the caller
            self.failure = e
            raise
        if first:
            yield self._make(True, None)
        if self._last is not None:
            yield self._last()

    def reraise(self) -> None:
        """Raise the error that reading the source failed with, if any."""
        if self.failure is not None:
            raise self.failure from None


def append_upload(
    session_id: str, source: TextSource, chunk_chars: int
) -> Upload[pb.AppendTextRequest]:
    """AppendText's requests: ``source`` in chunks of at most ``chunk_chars`` characters."""
    # marks_last: a cancelled upload may reach the server as a plain end of stream; the
    # final marked chunk tells a complete upload from an abandoned one.
    return Upload(
        iter_text_chunks(source, chunk_chars),
        lambda first, chunk: pb.AppendTextRequest(
            session_id=session_id if first else "", text=chunk or "", marks_last=first
        ),
        lambda: pb.AppendTextRequest(last=True),
    )


def import_upload(
    session_id: str, source: ArchiveSource, chunk_bytes: int
) -> Upload[pb.ImportSessionRequest]:
    """ImportSession's requests: the archive in chunks of at most ``chunk_bytes`` bytes."""
    return Upload(
        iter_bytes(source, chunk_bytes),
        lambda first, chunk: pb.ImportSessionRequest(
            session_id=session_id if first else "", data=chunk or b""
        ),
    )


def write_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` (an exported archive, a converted model) to ``path`` atomically: a
    temporary file renamed into place once complete."""
    tmp = f"{os.fspath(path)}.part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Request messages.


def create_request(arguments: Mapping[str, Any]) -> tuple[pb.CreateSessionRequest, str]:
    """CreateSession's request from ``create_session``'s arguments (its ``locals()``): every
    argument not in _CREATE_ARGS (nor ``self``, ``timeout``) is a SessionConfig field."""
    hyper = {
        name: value
        for name, value in arguments.items()
        if name not in _CREATE_ARGS and name not in ("self", "timeout")
    }
    return create_session_request(
        arguments["text"],
        session_id=arguments["session_id"],
        preset=arguments["preset"],
        alphabet=arguments["alphabet"],
        hyper=hyper,
        optimizer=arguments["optimizer"],
        dtype=arguments["dtype"],
        cell=arguments["cell"],
    )


def train_request(session_id: str, arguments: Mapping[str, Any]) -> pb.TrainRequest:
    """Train's request from ``Session.train``'s arguments (its ``locals()``); None leaves a
    field unset (the server's default)."""
    request = pb.TrainRequest(session_id=session_id)
    for name, value in arguments.items():
        if name not in ("self", "timeout") and value is not None:
            setattr(request, name, value)
    return request


def update_request(
    session_id: str,
    learning_rate: float | None,
    clip: float | None,
    reset_every: int | None,
    optimizer: str | int | None,
) -> pb.UpdateSessionRequest:
    """UpdateSession's request: the given settings and a field mask of just those."""
    config, paths = config_changes(learning_rate, clip, reset_every, optimizer)
    return pb.UpdateSessionRequest(
        session=pb.Session(session_id=session_id, config=config),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )


def fork_request(
    session_id: str,
    new_session_id: str,
    learning_rate: float | None,
    clip: float | None,
    reset_every: int | None,
    optimizer: str | int | None,
) -> pb.ForkSessionRequest:
    """ForkSession's request: a copy under ``new_session_id`` with the given settings."""
    config, _ = config_changes(learning_rate, clip, reset_every, optimizer, required=False)
    return pb.ForkSessionRequest(
        session_id=session_id, new_session_id=new_session_id, config=config
    )


def list_request(page_size: int, token: str, seen: set[str]) -> pb.ListSessionsRequest:
    """ListSessions' request for the page after ``token``; refuses a token seen before (a
    server that repeats one would page forever)."""
    if token in seen:
        raise RnnServeError(f"the server repeated page token {token!r}")
    seen.add(token)
    return pb.ListSessionsRequest(page_size=page_size, page_token=token)


_DECAYS = {
    "": pb.LEARNING_RATE_DECAY_UNSPECIFIED,
    "constant": pb.LEARNING_RATE_DECAY_UNSPECIFIED,
    "cosine": pb.LEARNING_RATE_DECAY_COSINE,
    "linear": pb.LEARNING_RATE_DECAY_LINEAR,
}


def start_job_request(
    session_id: str, arguments: Mapping[str, Any], request_id: str | None
) -> pb.StartJobRequest:
    """StartJob's request from ``Session.start_training``'s arguments (its ``locals()``):
    the JobSpec fields, the schedule's (warmup_steps, decay, min_learning_rate) and a
    request_id (a new UUID unless given, so the caller may retry the call safely)."""
    spec = pb.JobSpec()
    for name, value in arguments.items():
        if name in ("self", "timeout", "request_id") or value is None:
            continue
        if name == "warmup_steps":
            spec.schedule.warmup_steps = value
        elif name == "decay":
            if value not in _DECAYS:
                raise ValueError(f"decay must be one of {sorted(_DECAYS)[1:]}, not {value!r}")
            spec.schedule.decay = _DECAYS[value]
        elif name == "min_learning_rate":
            spec.schedule.min_learning_rate = value
        else:
            setattr(spec, name, value)
    return pb.StartJobRequest(
        session_id=session_id, spec=spec, request_id=request_id or uuid.uuid4().hex
    )
