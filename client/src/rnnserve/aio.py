"""The asyncio client: :class:`Client` and :class:`Session` with the methods of the sync ones
(:mod:`rnnserve.client`), as coroutines and async iterators, raising the same errors::

    from rnnserve.aio import Client

    async with Client("localhost:50051") as client:
        session = await client.create_session(open("input.txt").read())
        async for progress in session.train(2000, report_every=200):
            print(progress.step, progress.loss)
        print(await session.generate(200, seed=1))

Requests are built and errors mapped by the same code as the sync client's (``rnnserve._common``,
:func:`rnnserve.errors.error_from_rpc`); the same calls are retried (see the README).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve._common import (
    DEFAULT_ADDRESS,
    auth_metadata,
    channel_credentials,
    channel_options,
    create_session_request,
    generate_request,
    health_status_name,
)
from rnnserve.client import DEFAULT_CHUNK_CHARS, TextSource, iter_text_chunks
from rnnserve.errors import RnnServeError, Timeout, error_from_rpc
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

__all__ = ["Client", "Session", "Stream", "TrainStream"]

M = TypeVar("M")
T = TypeVar("T")


class Stream(AsyncIterator[T], Generic[M, T]):
    """An async iterator over a server stream that can be stopped early: :meth:`cancel`,
    leaving an ``async with`` block, or breaking out of ``async for`` and dropping it. After a
    cancel the iterator simply ends; errors from the server raise the matching
    :class:`~rnnserve.errors.RnnServeError`."""

    def __init__(self, call: Any, convert: Callable[[M], Iterable[T]]) -> None:
        self._call = call
        self._responses: AsyncIterator[M] = call.__aiter__()
        self._convert = convert
        self._pending: deque[T] = deque()
        self._cancelled = False
        self._done = False

    def __aiter__(self) -> Stream[M, T]:
        return self

    async def __anext__(self) -> T:
        while not self._pending:
            if self._done:
                raise StopAsyncIteration
            try:
                message = await self._responses.__anext__()
            except StopAsyncIteration:
                self._done = True
                raise
            except asyncio.CancelledError:
                if not self._cancelled:
                    raise
                self._done = True
                raise StopAsyncIteration from None
            except grpc.RpcError as e:
                self._done = True
                if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                    raise StopAsyncIteration from None
                raise error_from_rpc(e) from None
            self._observe(message)
            self._pending.extend(self._convert(message))
        return self._pending.popleft()

    def _observe(self, message: M) -> None:
        """Hook for subclasses: sees every response message before it is converted."""

    @property
    def done(self) -> bool:
        """True once the stream has ended, failed or been cancelled."""
        return self._done

    def cancel(self) -> None:
        """Cancel the call; safe to call more than once."""
        if not self._done:
            self._cancelled = True
            self._call.cancel()
            self._done = True

    async def __aenter__(self) -> Stream[M, T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cancel()


class TrainStream(Stream[pb.TrainResponse, pb.TrainResponse]):
    """The progress of a Train call; ``last`` and ``final`` as in the sync
    :class:`rnnserve.TrainStream`."""

    def __init__(self, call: Any) -> None:
        super().__init__(call, lambda message: (message,))
        self.last: pb.TrainResponse | None = None
        self.final: pb.TrainResponse | None = None

    def _observe(self, message: pb.TrainResponse) -> None:
        self.last = message
        if message.stop_reason != pb.STOP_REASON_UNSPECIFIED:
            self.final = message

    async def wait(self) -> pb.TrainResponse:
        """Consume the rest of the stream and return the final message (or the last one seen)."""
        async for _ in self:
            pass
        result = self.final or self.last
        if result is None:
            raise RnnServeError("the Train stream ended without any message")
        return result


class Client:
    """An asyncio connection to an rnnserve server; the arguments are those of the sync
    :class:`rnnserve.Client`. Use it inside one event loop (``async with``)."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        timeout: float | None = 30.0,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        tls: bool = False,
        tls_server_name: str | None = None,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._metadata = auth_metadata(token)
        self._options = list(options)
        self._tls_server_name = tls_server_name
        self._credentials = channel_credentials(ca_file, tls)
        self._channel = self._make_channel(generate=False)
        self._stub = pb_grpc.RnnServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._seeded_channel: aio.Channel | None = None  # as in the sync client

    def _make_channel(self, *, generate: bool) -> aio.Channel:
        options = channel_options(self._options, self._tls_server_name, generate=generate)
        if self._credentials is None:
            return aio.insecure_channel(self.address, options=options)
        return aio.secure_channel(self.address, self._credentials, options=options)

    def _generate_method(self, seeded: bool) -> Any:
        if not seeded:
            return self._stub.Generate
        if self._seeded_channel is None:
            self._seeded_channel = self._make_channel(generate=True)
        return pb_grpc.RnnServiceStub(self._seeded_channel).Generate

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def _server_stream(self, method: Any, request: Any, timeout: float | None) -> Any:
        return method(request, timeout=timeout, metadata=self._metadata)

    async def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        await self._channel.close(None)
        if self._seeded_channel is not None:
            await self._seeded_channel.close(None)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"aio.Client({self.address!r})"

    async def create_session(
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
        timeout: float | None = None,
    ) -> Session:
        """Create a session from ``text``; see :meth:`rnnserve.Client.create_session`."""
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
            },
            optimizer=optimizer,
            dtype=dtype,
        )
        response = await self._unary(self._stub.CreateSession, request, timeout)
        session = Session(self, response.session.session_id, response.session)
        if rest:
            await session.append_text(rest)
        return session

    def session(self, session_id: str) -> Session:
        """A handle on an existing session; makes no call (errors surface on first use)."""
        return Session(self, session_id)

    async def list_sessions(
        self, page_size: int = 100, *, timeout: float | None = None
    ) -> AsyncIterator[pb.Session]:
        """Every session on the server, ordered by id, fetched one page at a time."""
        token = ""
        seen: set[str] = set()
        while True:
            request = pb.ListSessionsRequest(page_size=page_size, page_token=token)
            response = await self._unary(self._stub.ListSessions, request, timeout)
            for session in response.sessions:
                yield session
            token = response.next_page_token
            if not token:
                return
            if token in seen:
                raise RnnServeError(f"the server repeated page token {token!r}")
            seen.add(token)

    async def health(
        self, service: str = "", *, timeout: float | None = None, wait_for_ready: bool = False
    ) -> str:
        """The grpc.health.v1 status of ``service``; see :meth:`rnnserve.Client.health`."""
        try:
            response = await self._health.Check(
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

    async def wait_ready(self, timeout: float = 10.0, *, service: str = "") -> None:
        """Wait until the server reports SERVING; Timeout after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise Timeout(
                f"the server at {self.address} was not ready within {timeout:g} s (unreachable)"
            ) from None
        status = "UNKNOWN"
        while (remaining := deadline - loop.time()) > 0:
            try:
                status = await self.health(service, timeout=remaining, wait_for_ready=True)
            except Timeout:
                break
            if status == "SERVING":
                return
            await asyncio.sleep(min(0.05, max(deadline - loop.time(), 0)))
        raise Timeout(
            f"the server at {self.address} was not ready within {timeout:g} s "
            f"(last status: {status})"
        )


class Session:
    """A handle on one session of an asyncio :class:`Client`; every method is one RPC."""

    def __init__(self, client: Client, session_id: str, info: pb.Session | None = None) -> None:
        self._client = client
        self.id = session_id
        self.last_info = info

    def __repr__(self) -> str:
        return f"aio.Session({self.id!r})"

    async def info(self, *, timeout: float | None = None) -> pb.Session:
        """The session's configuration, state and progress."""
        request = pb.GetSessionRequest(session_id=self.id)
        response = await self._client._unary(self._client._stub.GetSession, request, timeout)
        self.last_info = response.session
        return response.session  # type: ignore[no-any-return]

    async def delete(self, *, timeout: float | None = None) -> None:
        """Delete the session from the server's memory and disk."""
        request = pb.DeleteSessionRequest(session_id=self.id)
        await self._client._unary(self._client._stub.DeleteSession, request, timeout)

    async def step(
        self, text: str | None = None, *, timeout: float | None = None
    ) -> pb.StepResponse:
        """One optimizer update: on the corpus's next window, or on ``text`` from a zero state."""
        request = pb.StepRequest(session_id=self.id, text=text or "")
        return await self._client._unary(self._client._stub.Step, request, timeout)  # type: ignore[no-any-return]

    async def predict(self, text: str, *, timeout: float | None = None) -> pb.PredictResponse:
        """Most likely next character at each position of ``text``, and the loss on it."""
        request = pb.PredictRequest(session_id=self.id, text=text)
        return await self._client._unary(self._client._stub.Predict, request, timeout)  # type: ignore[no-any-return]

    def train(
        self,
        steps: int,
        report_every: int = 0,
        sample_length: int = 0,
        *,
        timeout: float | None = None,
    ) -> TrainStream:
        """Apply ``steps`` updates, streaming progress; see :meth:`rnnserve.Session.train`."""
        request = pb.TrainRequest(
            session_id=self.id, steps=steps, report_every=report_every, sample_length=sample_length
        )
        return TrainStream(self._client._server_stream(self._client._stub.Train, request, timeout))

    def watch_loss(
        self, from_step: int = 1, *, timeout: float | None = None
    ) -> Stream[pb.WatchLossResponse, pb.LossPoint]:
        """Every update's loss from ``from_step`` on, then live; cancel it to stop watching."""
        request = pb.WatchLossRequest(session_id=self.id, from_step=from_step)
        call = self._client._server_stream(self._client._stub.WatchLoss, request, timeout)
        return Stream(call, lambda response: response.points)

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
        """Sample ``length`` characters after ``prime``, in chunks as they are made."""
        request = generate_request(self.id, length, prime, temperature, top_k, seed)
        method = self._client._generate_method(seed is not None)
        call = self._client._server_stream(method, request, timeout)
        return Stream(call, lambda response: (response.text,) if response.text else ())

    async def generate(
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
        stream = self.generate_stream(length, prime, temperature, top_k, seed, timeout=timeout)
        return "".join([chunk async for chunk in stream])

    async def append_text(
        self,
        source: TextSource,
        chunk_chars: int = DEFAULT_CHUNK_CHARS,
        *,
        timeout: float | None = None,
    ) -> pb.AppendTextResponse:
        """Add text to the corpus in chunks; see :meth:`rnnserve.Session.append_text`. A file
        source is read in the event loop's thread, a chunk at a time."""
        failure: list[Exception] = []

        async def requests() -> AsyncIterator[pb.AppendTextRequest]:
            first = True
            try:
                for chunk in iter_text_chunks(source, chunk_chars):
                    yield pb.AppendTextRequest(session_id=self.id if first else "", text=chunk)
                    first = False
            except Exception as e:  # raised inside gRPC's request consumer: hand it back
                failure.append(e)
                raise
            if first:
                yield pb.AppendTextRequest(session_id=self.id)

        try:
            response: pb.AppendTextResponse = await self._client._stub.AppendText(
                requests(), timeout=timeout, metadata=self._client._metadata
            )
        except (grpc.RpcError, asyncio.CancelledError) as e:
            if failure:
                raise failure[0] from None
            if isinstance(e, asyncio.CancelledError):
                raise
            raise error_from_rpc(e) from None
        self.last_info = response.session
        return response
