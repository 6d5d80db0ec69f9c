"""The rnnserve client: a :class:`Client` for the server, a :class:`Session` handle per session.

Results are the generated protobuf messages (``rnnserve.v1.rnn_service_pb2``); failures are
the typed exceptions of :mod:`rnnserve.errors`. Unary calls get the client's timeout; the
long streams (Train, WatchLoss, Generate) and the AppendText upload get no deadline unless
one is passed.
"""

from __future__ import annotations

import codecs
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import IO, Any, Generic, TypeVar

import grpc
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve._common import (
    ADDRESS_ENV,
    CELLS,
    DEFAULT_ADDRESS,
    DTYPES,
    INLINE_TEXT_CHARS,
    OPTIMIZERS,
    PRESETS,
    TOKEN_ENV,
    auth_metadata,
    channel_credentials,
    channel_options,
    config_changes,
    create_session_request,
    generate_request,
    health_status_name,
)
from rnnserve.errors import InvalidArgument, RnnServeError, Timeout, error_from_rpc
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

__all__ = [
    "ADDRESS_ENV",
    "CELLS",
    "DEFAULT_ADDRESS",
    "DEFAULT_CHUNK_CHARS",
    "DTYPES",
    "INLINE_TEXT_CHARS",
    "OPTIMIZERS",
    "PRESETS",
    "TOKEN_ENV",
    "Client",
    "Session",
    "Stream",
    "TextSource",
    "TrainStream",
]

# 64 Ki characters are at most 256 KiB of UTF-8: far under gRPC's 4 MiB default message limit.
DEFAULT_CHUNK_CHARS = 65536
# Archive chunks sent by ImportSession: 256 KiB, like AppendText's largest, far under the
# 4 MiB message limit.
DEFAULT_CHUNK_BYTES = 256 * 1024

# Text for append_text: a whole string, a text or binary file, or an iterable of chunks.
TextSource = str | bytes | IO[str] | IO[bytes] | Iterable[str] | Iterable[bytes]

Req = TypeVar("Req")
Resp = TypeVar("Resp")
M = TypeVar("M")
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Chunking for AppendText.


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


# ---------------------------------------------------------------------------------------------
# Streams.


class Stream(Iterator[T], Generic[M, T]):
    """An iterator over a server stream that can be stopped early.

    Leaving a ``for`` loop over it (``break``, an exception), :meth:`cancel`, :meth:`close`
    or leaving a ``with`` block cancels the call on the server. After a cancel the iterator
    simply ends; errors from the server raise the matching :class:`RnnServeError`.
    """

    def __init__(self, call: grpc.CallIterator[M], convert: Callable[[M], Iterable[T]]) -> None:
        self._call = call
        self._responses: Iterator[M] = iter(call)
        self._convert = convert
        self._pending: deque[T] = deque()
        self._cancelled = False
        self._done = False

    def __next__(self) -> T:
        while not self._pending:
            if self._done:
                raise StopIteration
            try:
                message = next(self._responses)
            except StopIteration:
                self._done = True
                raise
            except grpc.RpcError as e:
                self._done = True
                if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                    raise StopIteration from None
                raise error_from_rpc(e) from None
            self._observe(message)
            self._pending.extend(self._convert(message))
        return self._pending.popleft()

    def __iter__(self) -> Iterator[T]:
        # A fresh generator per loop: when the loop is left early the generator is closed,
        # and its finally-clause cancels the call even if the caller still holds the stream.
        def loop() -> Iterator[T]:
            try:
                while True:
                    try:
                        item = next(self)
                    except StopIteration:
                        return
                    yield item
            finally:
                if not self._done:
                    self.cancel()

        return loop()

    def _observe(self, message: M) -> None:
        """Hook for subclasses: sees every response message before it is converted."""

    @property
    def done(self) -> bool:
        """True once the stream has ended, failed or been cancelled."""
        return self._done

    def cancel(self) -> None:
        """Cancel the call; safe to call from another thread and more than once."""
        if not self._done:
            self._cancelled = True
            self._call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it bare
            self._done = True

    def close(self) -> None:
        """Same as :meth:`cancel`."""
        self.cancel()

    def __enter__(self) -> Stream[M, T]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()


class TrainStream(Stream[pb.TrainResponse, pb.TrainResponse]):
    """The progress of a Train call: every TrainResponse, the last one with ``stop_reason`` set.

    ``last`` is the newest message received and ``final`` the closing one (``None`` until it
    arrives, and forever if the stream was cancelled).
    """

    def __init__(self, call: grpc.CallIterator[pb.TrainResponse]) -> None:
        super().__init__(call, lambda message: (message,))
        self.last: pb.TrainResponse | None = None
        self.final: pb.TrainResponse | None = None

    def _observe(self, message: pb.TrainResponse) -> None:
        self.last = message
        if message.stop_reason != pb.STOP_REASON_UNSPECIFIED:
            self.final = message

    def wait(self) -> pb.TrainResponse:
        """Consume the rest of the stream and return the final message (or the last one seen)."""
        for _ in self:
            pass
        result = self.final or self.last
        if result is None:
            raise RnnServeError("the Train stream ended without any message")
        return result


# ---------------------------------------------------------------------------------------------


class Client:
    """A connection to an rnnserve server.

    ``timeout`` (seconds) is the deadline of every unary call; ``None`` means none. ``token``
    (default: the ``RNNSERVE_TOKEN`` environment variable) is sent as ``authorization: Bearer
    <token>``. ``ca_file`` connects over TLS trusting that CA certificate (PEM); ``tls=True``
    connects over TLS with gRPC's default roots; ``tls_server_name`` overrides the name the
    server's certificate must carry. ``options`` are extra gRPC channel options. ``address``
    defaults to the ``RNNSERVE_ADDRESS`` environment variable, then ``localhost:50051``.

    Example::

        from rnnserve import Client

        with Client("localhost:50051") as client:
            session = client.create_session("Hallo", preset="notebook", session_id="hallo")
            for _ in range(30):
                session.step()
            print(session.predict("Hallo").predicted)  # alloH
            for progress in session.train(1000, report_every=100):
                print(progress.step, progress.loss)
            print(session.generate(50, prime="H", seed=1))
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = 30.0,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        tls: bool = False,
        tls_server_name: str | None = None,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        if address is None:
            # Like the CLI's --address: the environment, then localhost.
            address = os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
        self.address = address
        self.timeout = timeout
        self._metadata = auth_metadata(token)
        self._options = list(options)
        self._tls_server_name = tls_server_name
        self._credentials = channel_credentials(ca_file, tls)
        self._channel = self._make_channel(generate=False)
        self._stub = pb_grpc.RnnServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        # Seeded Generate calls may be retried (the same seed makes the same text), unseeded
        # ones not; a retry policy is per method, so they get a channel of their own, made on
        # first use.
        self._seeded_channel: grpc.Channel | None = None

    def _make_channel(self, *, generate: bool) -> grpc.Channel:
        options = channel_options(self._options, self._tls_server_name, generate=generate)
        if self._credentials is None:
            return grpc.insecure_channel(self.address, options=options)
        return grpc.secure_channel(self.address, self._credentials, options=options)

    def _generate_method(
        self, seeded: bool
    ) -> grpc.UnaryStreamMultiCallable[pb.GenerateRequest, pb.GenerateResponse]:
        if not seeded:
            return self._stub.Generate
        if self._seeded_channel is None:
            self._seeded_channel = self._make_channel(generate=True)
        return pb_grpc.RnnServiceStub(self._seeded_channel).Generate

    # -- plumbing -----------------------------------------------------------------------------

    def _unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        timeout: float | None,
    ) -> Resp:
        try:
            return method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def _server_stream(
        self,
        method: grpc.UnaryStreamMultiCallable[Req, Resp],
        request: Req,
        timeout: float | None,
    ) -> grpc.CallIterator[Resp]:
        # The call starts lazily; errors surface when the stream is iterated.
        return method(request, timeout=timeout, metadata=self._metadata)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()
        if self._seeded_channel is not None:
            self._seeded_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.address!r})"

    # -- sessions -----------------------------------------------------------------------------

    def create_session(
        self,
        text: str = "",
        *,
        session_id: str = "",
        preset: str | int = "default",
        alphabet: str = "",
        hidden_size: int | None = None,
        seq_length: int | None = None,
        batch_size: int | None = None,
        learning_rate: float | None = None,
        optimizer: str | int | None = None,
        clip: float | None = None,
        seed: int | None = None,
        dtype: str | int | None = None,
        reset_every: int | None = None,
        validation_fraction: float | None = None,
        cell: str | int | None = None,
        num_layers: int | None = None,
        dropout: float | None = None,
        timeout: float | None = None,
    ) -> Session:
        """Create a session from ``text``; unset hyperparameters take the preset's values.

        ``preset`` is "default", "notebook", "min-char-rnn" or "quality"; ``optimizer``
        "sgd", "adagrad" or "adam"; ``dtype`` "float32" or "float64"; ``cell`` "rnn", "lstm"
        or "gru" (or the proto enum values); ``dropout`` (between layers, training only) needs
        ``num_layers`` >= 2; ``validation_fraction`` holds that share of the corpus's tail out
        of training to measure the validation loss. An empty
        ``session_id`` lets the server make one. A text longer than a few hundred thousand
        characters is sent in chunks after the call that creates the session (with the
        alphabet fixed up front to ``sorted(set(text))``, what the server would pick).
        """
        request, rest = create_session_request(
            text,
            session_id=session_id,
            preset=preset,
            alphabet=alphabet,
            hyper={
                "hidden_size": hidden_size,
                "seq_length": seq_length,
                "batch_size": batch_size,
                "learning_rate": learning_rate,
                "clip": clip,
                "seed": seed,
                "reset_every": reset_every,
                "validation_fraction": validation_fraction,
                "num_layers": num_layers,
                "dropout": dropout,
            },
            optimizer=optimizer,
            dtype=dtype,
            cell=cell,
        )
        response = self._unary(self._stub.CreateSession, request, timeout)
        session = Session(self, response.session.session_id, response.session)
        if rest:
            session.append_text(rest)
        return session

    def import_session(
        self,
        source: str | os.PathLike[str] | bytes | IO[bytes],
        session_id: str = "",
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout: float | None = None,
    ) -> Session:
        """A new session from an archive made by :meth:`Session.export` (a path, the bytes,
        or a binary file), streamed in chunks. An empty ``session_id`` takes the archive's."""
        failure: list[Exception] = []

        def requests() -> Iterator[pb.ImportSessionRequest]:
            first = True
            try:
                for chunk in _iter_bytes(source, chunk_bytes):
                    yield pb.ImportSessionRequest(
                        session_id=session_id if first else "", data=chunk
                    )
                    first = False
            except Exception as e:  # raised in gRPC's thread: hand it back to the caller
                failure.append(e)
                raise
            if first:
                yield pb.ImportSessionRequest(session_id=session_id)

        try:
            response: pb.ImportSessionResponse = self._stub.ImportSession(
                requests(), timeout=timeout, metadata=self._metadata
            )
        except grpc.RpcError as e:
            if failure:
                raise failure[0] from None
            raise error_from_rpc(e) from None
        return Session(self, response.session.session_id, response.session)

    def session(self, session_id: str) -> Session:
        """A handle on an existing session; makes no call (errors surface on first use)."""
        return Session(self, session_id)

    def list_sessions(
        self, page_size: int = 100, *, timeout: float | None = None
    ) -> Iterator[pb.Session]:
        """Every session on the server, ordered by id, fetched one page at a time."""
        token = ""
        seen: set[str] = set()
        while True:
            request = pb.ListSessionsRequest(page_size=page_size, page_token=token)
            response = self._unary(self._stub.ListSessions, request, timeout)
            yield from response.sessions
            token = response.next_page_token
            if not token:
                return
            if token in seen:
                raise RnnServeError(f"the server repeated page token {token!r}")
            seen.add(token)

    # -- health -------------------------------------------------------------------------------

    def health(
        self, service: str = "", *, timeout: float | None = None, wait_for_ready: bool = False
    ) -> str:
        """The grpc.health.v1 status of ``service`` ("" is the whole server).

        Returns "SERVING", "NOT_SERVING", "UNKNOWN" or "SERVICE_UNKNOWN" (the server does
        not know that service name). Raises ServerUnavailable if nothing answers.
        """
        try:
            response = self._health.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
                wait_for_ready=wait_for_ready,
            )
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise error_from_rpc(e) from None
        return health_status_name(response)

    def wait_ready(self, timeout: float = 10.0, *, service: str = "") -> None:
        """Block until the server reports SERVING; Timeout after ``timeout`` seconds.

        gRPC's ``channel_ready_future`` waits for the connection; then health Checks (with
        ``wait_for_ready``) until the server says SERVING.
        """
        deadline = time.monotonic() + timeout
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            ready.cancel()  # stops watching the channel's connectivity
            raise Timeout(
                f"the server at {self.address} was not ready within {timeout:g} s (unreachable)"
            ) from None
        status = "UNKNOWN"
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                status = self.health(service, timeout=remaining, wait_for_ready=True)
            except Timeout:
                break
            if status == "SERVING":
                return
            time.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
        raise Timeout(
            f"the server at {self.address} was not ready within {timeout:g} s "
            f"(last status: {status})"
        )


def _iter_bytes(
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
            yield from _iter_bytes(f, chunk_bytes)
        return
    while chunk := source.read(chunk_bytes):
        yield chunk


class Session:
    """A handle on one session of a :class:`Client`; every method is one RPC.

    ``last_info`` holds the newest description of the session the handle has seen (from
    create, :meth:`info` or :meth:`append_text`), or ``None``.
    """

    def __init__(self, client: Client, session_id: str, info: pb.Session | None = None) -> None:
        self._client = client
        self.id = session_id
        self.last_info = info

    def __repr__(self) -> str:
        return f"Session({self.id!r})"

    def info(self, *, timeout: float | None = None) -> pb.Session:
        """The session's configuration, state and progress."""
        request = pb.GetSessionRequest(session_id=self.id)
        self.last_info = self._client._unary(
            self._client._stub.GetSession, request, timeout
        ).session
        return self.last_info

    def delete(self, *, timeout: float | None = None) -> None:
        """Delete the session from the server's memory and disk."""
        request = pb.DeleteSessionRequest(session_id=self.id)
        self._client._unary(self._client._stub.DeleteSession, request, timeout)

    def step(self, text: str | None = None, *, timeout: float | None = None) -> pb.StepResponse:
        """One optimizer update: on the corpus's next window, or on ``text`` from a zero state."""
        request = pb.StepRequest(session_id=self.id, text=text or "")
        return self._client._unary(self._client._stub.Step, request, timeout)

    def predict(self, text: str, *, timeout: float | None = None) -> pb.PredictResponse:
        """Most likely next character at each position of ``text``, and the loss on it."""
        request = pb.PredictRequest(session_id=self.id, text=text)
        return self._client._unary(self._client._stub.Predict, request, timeout)

    def train(
        self,
        steps: int,
        report_every: int = 0,
        sample_length: int = 0,
        *,
        until_loss: float | None = None,
        patience: int = 0,
        eval_every: int = 0,
        sample_temperature: float | None = None,
        sample_prime: str = "",
        timeout: float | None = None,
    ) -> TrainStream:
        """Apply ``steps`` updates, streaming progress every ``report_every`` (0: ~1/s).

        Iterate the returned stream for the progress messages; the last one has
        ``stop_reason`` set. Stopping early (``break``, :meth:`TrainStream.cancel`) cancels
        the call and the server stops between two updates. ``stream.wait()`` runs to the end.

        ``until_loss`` stops once the loss (the validation loss if the session has a
        validation split, else the smoothed loss) reaches it; ``patience`` stops after that
        many validation measurements without a new best (early stopping); ``eval_every``
        measures the validation loss every that many updates (0: at each report). A loss
        above 2 ln V for a whole report window stops with ``STOP_REASON_DIVERGED``.
        """
        request = pb.TrainRequest(
            session_id=self.id,
            steps=steps,
            report_every=report_every,
            sample_length=sample_length,
            patience=patience,
            eval_every=eval_every,
            sample_prime=sample_prime,
        )
        if until_loss is not None:
            request.until_loss = until_loss
        if sample_temperature is not None:
            request.sample_temperature = sample_temperature
        return TrainStream(self._client._server_stream(self._client._stub.Train, request, timeout))

    def update(
        self,
        *,
        learning_rate: float | None = None,
        clip: float | None = None,
        reset_every: int | None = None,
        optimizer: str | int | None = None,
        timeout: float | None = None,
    ) -> pb.Session:
        """Change the given settings (UpdateSession with a field mask of just those). A new
        optimizer starts with fresh state. Refused (SessionBusy) while the session trains."""
        config, paths = config_changes(learning_rate, clip, reset_every, optimizer)
        request = pb.UpdateSessionRequest(
            session=pb.Session(session_id=self.id, config=config),
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        )
        self.last_info = self._client._unary(
            self._client._stub.UpdateSession, request, timeout
        ).session
        return self.last_info

    def fork(
        self,
        new_session_id: str,
        *,
        learning_rate: float | None = None,
        clip: float | None = None,
        reset_every: int | None = None,
        optimizer: str | int | None = None,
        timeout: float | None = None,
    ) -> Session:
        """A copy of this session (weights, optimizer state, corpus, history) under a new id,
        with the given settings changed."""
        config, _ = config_changes(learning_rate, clip, reset_every, optimizer, required=False)
        request = pb.ForkSessionRequest(
            session_id=self.id, new_session_id=new_session_id, config=config
        )
        response = self._client._unary(self._client._stub.ForkSession, request, timeout)
        return Session(self._client, response.session.session_id, response.session)

    def export_stream(
        self, *, timeout: float | None = None
    ) -> Stream[pb.ExportSessionResponse, bytes]:
        """The session's archive (see the README's "Export, import, fork"), in chunks."""
        request = pb.ExportSessionRequest(session_id=self.id)
        call = self._client._server_stream(self._client._stub.ExportSession, request, timeout)
        return Stream(call, lambda response: (response.data,) if response.data else ())

    def export(
        self, path: str | os.PathLike[str] | None = None, *, timeout: float | None = None
    ) -> bytes:
        """The session's archive as bytes; also written to ``path`` if given (atomically:
        a temporary file renamed into place once complete)."""
        data = b"".join(self.export_stream(timeout=timeout))
        if path is not None:
            tmp = f"{os.fspath(path)}.part"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        return data

    def watch_loss(
        self, from_step: int = 1, *, timeout: float | None = None
    ) -> Stream[pb.WatchLossResponse, pb.LossPoint]:
        """Every update's loss from ``from_step`` on, then live as anyone trains the session.

        The stream ends when the session is deleted or the server stops; cancel it to stop
        watching earlier.
        """
        request = pb.WatchLossRequest(session_id=self.id, from_step=from_step)
        call = self._client._server_stream(self._client._stub.WatchLoss, request, timeout)
        return Stream(call, lambda response: response.points)

    def loss_history(
        self, from_step: int = 1, *, timeout: float | None = None
    ) -> list[pb.LossPoint]:
        """Every update's loss from ``from_step`` up to the session's current step.

        A finite :meth:`watch_loss`: reads the history, stops when it reaches the step that
        GetSession reported at the start (later updates are left out).
        """
        until = self.info(timeout=timeout).step
        points: list[pb.LossPoint] = []
        if until < max(from_step, 1):
            return points
        with self.watch_loss(from_step, timeout=timeout) as stream:
            for point in stream:
                points.append(point)
                if point.step >= until:
                    break
        return points

    def generate_stream(
        self,
        length: int,
        prime: str = "",
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        *,
        timeout: float | None = None,
    ) -> Stream[pb.GenerateResponse, str]:
        """Sample ``length`` characters after ``prime``, yielded in chunks as they are made.

        ``temperature`` 0 is greedy; ``top_k`` > 0 samples among the k likeliest characters;
        the same ``seed`` gives the same text.
        """
        request = generate_request(self.id, length, prime, temperature, top_k, seed)
        method = self._client._generate_method(seed is not None)
        call = self._client._server_stream(method, request, timeout)
        return Stream(call, lambda response: (response.text,) if response.text else ())

    def generate(
        self,
        length: int,
        prime: str = "",
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        *,
        timeout: float | None = None,
    ) -> str:
        """:meth:`generate_stream`, joined into one string."""
        return "".join(
            self.generate_stream(length, prime, temperature, top_k, seed, timeout=timeout)
        )

    def append_text(
        self,
        source: TextSource,
        chunk_chars: int = DEFAULT_CHUNK_CHARS,
        *,
        timeout: float | None = None,
    ) -> pb.AppendTextResponse:
        """Add text to the corpus, streamed in chunks of at most ``chunk_chars`` characters.

        ``source`` is a str, a file object (text or binary, read a chunk at a time) or an
        iterable of chunks; see :func:`iter_text_chunks`. An error reading the source cancels
        the call and is re-raised as itself.
        """
        failure: list[Exception] = []

        def requests() -> Iterator[pb.AppendTextRequest]:
            first = True
            try:
                for chunk in iter_text_chunks(source, chunk_chars):
                    yield pb.AppendTextRequest(session_id=self.id if first else "", text=chunk)
                    first = False
            except Exception as e:  # raised in gRPC's thread: hand it back to the caller
                failure.append(e)
                raise
            if first:
                yield pb.AppendTextRequest(session_id=self.id)

        try:
            response: pb.AppendTextResponse = self._client._stub.AppendText(
                requests(), timeout=timeout, metadata=self._client._metadata
            )
        except grpc.RpcError as e:
            if failure:
                raise failure[0] from None
            raise error_from_rpc(e) from None
        self.last_info = response.session
        return response
