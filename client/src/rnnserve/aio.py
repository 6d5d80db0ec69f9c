"""The asyncio client: :class:`Client` and :class:`Session` with the methods of the sync ones
(:mod:`rnnserve.client`), as coroutines and async iterators, raising the same errors::

    from rnnserve.aio import Client

    async with Client("localhost:50051") as client:
        session = await client.create_session(open("input.txt").read())
        async for progress in session.train(2000, report_every=200):
            print(progress.step, progress.loss)
        print(await session.generate(200, seed=1))

Requests are built and errors mapped by the same code as the sync client's (``rnnserve._common``,
:func:`rnnserve.errors.error_from_rpc`); the same calls are retried (see docs/client.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2

from rnnserve._aio_jobs import Job, JobStream
from rnnserve._aio_rpc import RpcClient
from rnnserve._aio_session import Session
from rnnserve._aio_streams import Stream, TrainStream
from rnnserve._common import health_status_name
from rnnserve._requests import (
    DEFAULT_CHUNK_BYTES,
    ArchiveSource,
    create_request,
    import_upload,
    list_request,
)
from rnnserve.errors import Timeout, error_from_rpc
from rnnserve.v1 import rnn_service_pb2 as pb

__all__ = ["Client", "Job", "JobStream", "Session", "Stream", "TrainStream"]


class Client(RpcClient):
    """An asyncio connection to an rnnserve server; the arguments are those of the sync
    :class:`rnnserve.Client`. Use it inside one event loop (``async with``)."""

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
                timeout=self._deadline(timeout),
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
