"""The rnnserve client: a :class:`Client` for the server, a :class:`Session` handle per session.

Results are the generated protobuf messages (``rnnserve.v1.rnn_service_pb2``); failures are
the typed exceptions of :mod:`rnnserve.errors`. Unary calls get the client's timeout; the
long streams (Train, WatchLoss, Generate) and the AppendText upload get no deadline unless
one is passed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2

from rnnserve._common import (
    ADDRESS_ENV,
    CELLS,
    DEFAULT_ADDRESS,
    DTYPES,
    INLINE_TEXT_CHARS,
    OPTIMIZERS,
    PRESETS,
    TOKEN_ENV,
    health_status_name,
)
from rnnserve._jobs import Job, JobStream
from rnnserve._requests import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CHUNK_CHARS,
    ArchiveSource,
    TextSource,
    create_request,
    import_upload,
    iter_text_chunks,
    list_request,
)
from rnnserve._rpc import RpcClient
from rnnserve._session import Session
from rnnserve._streams import Stream, TrainStream
from rnnserve.errors import Timeout, error_from_rpc
from rnnserve.v1 import rnn_service_pb2 as pb

__all__ = [
    "ADDRESS_ENV",
    "CELLS",
    "DEFAULT_ADDRESS",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CHUNK_CHARS",
    "DTYPES",
    "INLINE_TEXT_CHARS",
    "OPTIMIZERS",
    "PRESETS",
    "TOKEN_ENV",
    "Client",
    "Job",
    "JobStream",
    "Session",
    "Stream",
    "TextSource",
    "TrainStream",
    "iter_text_chunks",
]


class Client(RpcClient):
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
        request, rest = create_request(locals())
        response = self._unary(self._stub.CreateSession, request, timeout)
        session = Session(self, response.session.session_id, response.session)
        if rest:
            session.append_text(rest)
        return session

    def import_session(
        self,
        source: ArchiveSource,
        session_id: str = "",
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout: float | None = None,
    ) -> Session:
        """A new session from an archive made by :meth:`Session.export` (a path, the bytes,
        or a binary file), streamed in chunks. An empty ``session_id`` takes the archive's."""
        upload = import_upload(session_id, source, chunk_bytes)
        response = self._client_stream(self._stub.ImportSession, upload, timeout)
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
            request = list_request(page_size, token, seen)
            response = self._unary(self._stub.ListSessions, request, timeout)
            yield from response.sessions
            token = response.next_page_token
            if not token:
                return

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
                timeout=self._deadline(timeout),
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
