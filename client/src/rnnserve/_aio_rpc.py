"""The asyncio client's plumbing, below :class:`rnnserve.aio.Client` and its ``Session``: the
channel and stubs, and the call wrappers that map gRPC errors to :mod:`rnnserve.errors`."""

from __future__ import annotations

import asyncio
from functools import cached_property
from typing import Any

import grpc
from grpc import aio

from rnnserve._base import BaseClient, session_of
from rnnserve._requests import Upload
from rnnserve.errors import error_from_rpc
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc


class RpcClient(BaseClient[aio.Channel]):
    """An asyncio channel to an rnnserve server and the calls made on it."""

    def _make_channel(self, *, generate: bool) -> aio.Channel:
        options = self._channel_options(generate=generate)
        if self._credentials is None:
            return aio.insecure_channel(self.address, options=options)
        return aio.secure_channel(self.address, self._credentials, options=options)

    @cached_property
    def _stub(self) -> pb_grpc.RnnServiceAsyncStub:
        return pb_grpc.RnnServiceStub(self._channel)

    def _generate_method(self, seeded: bool) -> Any:
        return pb_grpc.RnnServiceStub(self._generate_channel(seeded)).Generate

    async def _unary(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(
                request,
                timeout=self._deadline(timeout),
                metadata=self._call_metadata(session_of(request)),
            )
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None

    def _server_stream(self, method: Any, request: Any, timeout: float | None) -> Any:
        metadata = self._call_metadata(session_of(request))
        return method(request, timeout=timeout, metadata=metadata)

    async def _client_stream(
        self, method: Any, upload: Upload[Any], timeout: float | None, session_id: str = ""
    ) -> Any:
        # A sync request iterator: gRPC reads it in the event loop, a chunk at a time.
        metadata = self._call_metadata(session_id)
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
