"""Forward a gRPC call, as raw message bytes, to the replica that owns its session.

All four call kinds are carried: the caller's metadata (``authorization`` included), its
deadline (the time it has left), its cancellation (cancelling the inbound call cancels the
outbound one) and the owner's answer: status, details and trailing metadata (rich error
details travel in ``grpc-status-details-bin``). Messages are not decoded: a forward costs one
extra hop, not a parse. A forwarded call carries ``x-rnnserve-forwarded``; a replica that gets
one for a session it does not own must answer, not forward again (no loops).

:class:`~rnnserve_server.cluster.router.Router` picks the address per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal, cast

import grpc
import grpc.aio

FORWARDED_KEY = "x-rnnserve-forwarded"
# Metadata a hop must not copy: transport headers gRPC sets itself, and the hop marker.
_DROP = {"user-agent", "te", "content-type", "grpc-accept-encoding", "grpc-timeout"}

Kind = Literal["unary_unary", "unary_stream", "stream_unary", "stream_stream"]
Metadata = Sequence[tuple[str, str | bytes]]


def method_kinds(service: Any) -> dict[str, Kind]:
    """``{"/pkg.Service/Method": kind}`` for a protobuf ServiceDescriptor."""
    kinds: dict[str, Kind] = {}
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        if method.client_streaming:
            kinds[path] = "stream_stream" if method.server_streaming else "stream_unary"
        else:
            kinds[path] = "unary_stream" if method.server_streaming else "unary_unary"
    return kinds


def forwarded(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """True if this inbound call was forwarded by another replica."""
    return any(key == FORWARDED_KEY for key, _ in context.invocation_metadata() or ())


def _outbound_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> list[tuple[str, Any]]:
    metadata = [
        (key, value)
        for key, value in context.invocation_metadata() or ()
        if not key.startswith(":") and key not in _DROP and key != FORWARDED_KEY
    ]
    metadata.append((FORWARDED_KEY, "1"))
    return metadata


def _identity(data: bytes) -> bytes:
    return data


class Forwarder:
    """One channel per owner address, reused; forwards calls as bytes."""

    def __init__(
        self,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self._credentials = credentials
        self._options = list(options)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self.forwards = 0  # calls forwarded (for the replica's metrics)

    def channel(self, address: str) -> grpc.aio.Channel:
        """The (lazily connected) channel to ``address``."""
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is not None:
                channel = grpc.aio.secure_channel(address, self._credentials, self._options)
            else:
                channel = grpc.aio.insecure_channel(address, self._options)
            self._channels[address] = channel
        return channel

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(None)

    def _call_args(self, context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, Any]:
        self.forwards += 1
        remaining = context.time_remaining()
        return {
            "timeout": remaining if remaining is not None and remaining < 1e9 else None,
            "metadata": _outbound_metadata(context),
        }

    async def _relay_error(
        self, error: grpc.aio.AioRpcError, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        trailing = error.trailing_metadata()
        if trailing:
            # grpc.aio.Metadata iterates as (key, value) pairs (the stubs say otherwise).
            context.set_trailing_metadata(tuple(cast(Any, trailing)))
        await context.abort(error.code(), error.details() or "")

    async def unary_unary(
        self, address: str, method: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """Forward a unary call; the owner's response bytes."""
        stub = self.channel(address).unary_unary(method, _identity, _identity)
        call = stub(request, **self._call_args(context))
        try:
            response: bytes = await call
            return response
        except grpc.aio.AioRpcError as error:
            await self._relay_error(error, context)
            raise  # abort raised already; for the type checker
        finally:
            call.cancel()  # no-op once done; cancels the hop if we were cancelled

    async def unary_stream(
        self, address: str, method: str, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """Forward a server-streaming call; yields the owner's messages."""
        stub = self.channel(address).unary_stream(method, _identity, _identity)
        call = stub(request, **self._call_args(context))
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as error:
            await self._relay_error(error, context)
        finally:
            call.cancel()

    async def stream_unary(
        self,
        address: str,
        method: str,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> bytes:
        """Forward a client-streaming call; the owner's response bytes."""
        stub = self.channel(address).stream_unary(method, _identity, _identity)
        call = stub(requests, **self._call_args(context))
        try:
            response: bytes = await call
            return response
        except grpc.aio.AioRpcError as error:
            await self._relay_error(error, context)
            raise
        finally:
            call.cancel()

    async def stream_stream(
        self,
        address: str,
        method: str,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bytes]:
        """Forward a bidirectional call; yields the owner's messages."""
        stub = self.channel(address).stream_stream(method, _identity, _identity)
        call = stub(requests, **self._call_args(context))
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as error:
            await self._relay_error(error, context)
        finally:
            with contextlib.suppress(Exception):
                call.cancel()


def proxy_handler(forwarder: Forwarder, kinds: dict[str, Kind], address: str) -> Any:
    """A generic handler that forwards every method in ``kinds`` to ``address`` (a test
    harness and the shape the routing servicer takes: pick ``address`` per call)."""

    class _Handler(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # generic only in stubs
        def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
            method = handler_call_details.method
            kind = kinds.get(method)
            if kind is None:
                return None

            if kind == "unary_unary":

                async def uu(request: bytes, context: Any) -> bytes:
                    return await forwarder.unary_unary(address, method, request, context)

                return grpc.unary_unary_rpc_method_handler(uu)
            if kind == "unary_stream":
                # An async generator function: grpc.aio streams what it yields.
                async def us(request: bytes, context: Any) -> AsyncIterator[bytes]:
                    async for message in forwarder.unary_stream(address, method, request, context):
                        yield message

                return grpc.unary_stream_rpc_method_handler(us)
            if kind == "stream_unary":

                async def su(requests: AsyncIterator[bytes], context: Any) -> bytes:
                    return await forwarder.stream_unary(address, method, requests, context)

                return grpc.stream_unary_rpc_method_handler(su)

            async def ss(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
                async for message in forwarder.stream_stream(address, method, requests, context):
                    yield message

            return grpc.stream_stream_rpc_method_handler(ss)

    return _Handler()
