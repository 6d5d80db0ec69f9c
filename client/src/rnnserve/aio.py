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
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve._aio_session import Session
from rnnserve._aio_streams import Stream, TrainStream
from rnnserve._common import (
    ADDRESS_ENV,
    DEFAULT_ADDRESS,
    auth_metadata,
    channel_credentials,
    channel_options,
    health_status_name,
    session_metadata,
)
from rnnserve._requests import (
    DEFAULT_CHUNK_BYTES,
    ArchiveSource,
    Upload,
    create_request,
    import_upload,
    list_request,
)
from rnnserve.errors import Timeout, error_from_rpc
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

__all__ = ["Client", "Session", "Stream", "TrainStream"]


class Client:
    """An asyncio connection to an rnnserve server; the arguments are those of the sync
    :class:`rnnserve.Client`. Use it inside one event loop (``async with``)."""

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
        if address is None:  # as the sync client: the environment, then localhost
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
                metadata=session_metadata(self._metadata, getattr(request, "session_id", "")),
            )
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def _server_stream(self, method: Any, request: Any, timeout: float | None) -> Any:
        metadata = session_metadata(self._metadata, getattr(request, "session_id", ""))
        return method(request, timeout=timeout, metadata=metadata)

    async def _client_stream(
        self, method: Any, upload: Upload[Any], timeout: float | None, session_id: str = ""
    ) -> Any:
        # A sync request iterator: gRPC reads it in the event loop, a chunk at a time.
        metadata = session_metadata(self._metadata, session_id)
        try:
            return await method(iter(upload), timeout=timeout, metadata=metadata)
        except (grpc.RpcError, asyncio.CancelledError) as e:
            upload.reraise()
            if isinstance(e, asyncio.CancelledError):
                raise
            raise error_from_rpc(e) from None

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
        validation_fraction: float | None = None,
        cell: str | int | None = None,
        num_layers: int | None = None,
        dropout: float | None = None,
        timeout: float | None = None,
    ) -> Session:
        """Create a session from ``text``; see :meth:`rnnserve.Client.create_session`."""
        request, rest = create_request(locals())
        response = await self._unary(self._stub.CreateSession, request, timeout)
        session = Session(self, response.session.session_id, response.session)
        if rest:
            await session.append_text(rest)
        return session

    async def import_session(
        self,
        source: ArchiveSource,
        session_id: str = "",
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        timeout: float | None = None,
    ) -> Session:
        """A new session from an archive; see :meth:`rnnserve.Client.import_session`. A file
        source is read in the event loop's thread, a chunk at a time."""
        upload = import_upload(session_id, source, chunk_bytes)
        response = await self._client_stream(self._stub.ImportSession, upload, timeout)
        return Session(self, response.session.session_id, response.session)

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
            request = list_request(page_size, token, seen)
            response = await self._unary(self._stub.ListSessions, request, timeout)
            for session in response.sessions:
                yield session
            token = response.next_page_token
            if not token:
                return

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
