"""Forward a gRPC call, as raw message bytes, to the replica that owns its session.

All four call kinds are carried: the caller's metadata (``authorization`` included), its
deadline (the time it has left), its cancellation (cancelling the inbound call cancels the
outbound one) and the owner's answer: status, details and trailing metadata (rich error
details travel in ``grpc-status-details-bin``). Messages are relayed as bytes, not decoded. A
forwarded call carries ``x-rnnserve-forwarded``; a replica that gets one for a session it does
not own must answer, not forward again (no loops). With mutual TLS between replicas the hop
goes to the owner's peer port over a channel with this replica's certificate
(:class:`~rnnserve_server.cluster.security.PeerTls`), and the router honours the marker only
from a verified peer (:func:`~rnnserve_server.cluster.security.from_peer`).

A failure of the hop itself is not relayed as is (its text names internal addresses): an owner
that can't be reached, or that froze until it lost the session's lease, ends the call with
:class:`~rnnserve_server.errors.OwnerUnavailableError` (UNAVAILABLE, a sentence, RetryInfo).

:class:`~rnnserve_server.cluster.router.Router` picks the address per call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Literal, cast

import grpc
import grpc.aio
from google.rpc import error_details_pb2, status_pb2

from rnnserve_server.errors import OwnerUnavailableError

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


# A failed hop without the owner's google.rpc.Status came from the transport (the owner died,
# a connection broke), not from the owner: its text names internal addresses, so the caller
# gets a sentence instead.
_TRANSPORT_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


def hop_failed(error: grpc.aio.AioRpcError) -> bool:
    """True if the error is the hop's own failure (the owner could not be reached, or died
    mid-call), not an answer from the owner (which carries its status details)."""
    trailing = tuple(cast(Any, error.trailing_metadata() or ()))
    from_owner = any(key == _STATUS_DETAILS_KEY for key, _ in trailing)
    return not from_owner and error.code() in _TRANSPORT_CODES


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason a replica put in its error's status details ("" if none)."""
    for key, value in cast(Any, error.trailing_metadata() or ()):
        if key != _STATUS_DETAILS_KEY:
            continue
        for detail in status_pb2.Status.FromString(value).details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return str(info.reason)
    return ""


# Told (session id, owner address); returns once that owner no longer holds the session's lease.
OwnerGone = Callable[[str, str], Awaitable[None]]


class Forwarder:
    """One channel per owner address, reused; forwards calls as bytes.

    With ``owner_gone``, a forwarded call whose owner loses the session's lease meanwhile (it
    froze past the lease) is given up rather than left waiting for the caller's deadline: the
    caller gets OWNER_UNAVAILABLE with RetryInfo 0 (retry now: the session moves to a replica
    that answers). An owner that can't be reached gives OWNER_UNAVAILABLE with RetryInfo
    ``retry_seconds``.
    """

    def __init__(
        self,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        owner_gone: OwnerGone | None = None,
        retry_seconds: float = 1.0,
    ) -> None:
        self._credentials = credentials
        self._options = list(options)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._owner_gone = owner_gone
        self.retry_seconds = retry_seconds
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

    def _watch(self, call: Any, session_id: str, address: str) -> asyncio.Task[None] | None:
        """A task that cancels the hop once its owner has lost the session's lease."""
        owner_gone = self._owner_gone
        if owner_gone is None or not session_id:
            return None

        async def cancel_when_gone() -> None:
            await owner_gone(session_id, address)
            call.cancel()

        return asyncio.create_task(cancel_when_gone(), name=f"forward-watch:{session_id}")

    async def _relay(
        self,
        call: Any,
        streaming: bool,
        context: grpc.aio.ServicerContext[Any, Any],
        session_id: str,
        address: str,
    ) -> AsyncGenerator[bytes, None]:
        """The hop's messages (one for a unary response); its failure becomes the caller's."""
        watch = self._watch(call, session_id, address)
        try:
            if streaming:
                async for message in call:
                    yield message
            else:
                yield await call
            return
        except grpc.aio.AioRpcError as error:
            if not _fired(watch):
                await self._relay_error(error, context, session_id)
        except asyncio.CancelledError:
            if not _fired(watch):
                raise  # the caller went away
        finally:
            if watch is not None and not watch.done():
                watch.cancel()
            call.cancel()  # no-op once done; cancels the hop if we were cancelled
        raise OwnerUnavailableError(
            f"the replica that owned session {session_id!r} stopped answering and lost the "
            "session's lease; retry now: the session moves to a replica that answers (the "
            "call may have been applied before the owner stopped; with until_step a retry "
            "never trains past its target)",
            session_id=session_id,
            retry_seconds=0.0,
        )

    async def _relay_error(
        self,
        error: grpc.aio.AioRpcError,
        context: grpc.aio.ServicerContext[Any, Any],
        session_id: str,
    ) -> None:
        # grpc.aio.Metadata iterates as (key, value) pairs (the stubs say otherwise).
        trailing = tuple(cast(Any, error.trailing_metadata() or ()))
        if hop_failed(error):
            raise OwnerUnavailableError(
                f"session {session_id!r} is owned by another replica, which did not answer "
                "(it may have just failed); retry in a moment: once its lease lapses "
                "(--lease-ttl) the session moves to a replica that answers",
                session_id=session_id,
                retry_seconds=self.retry_seconds,
            )
        if trailing:
            context.set_trailing_metadata(trailing)
        await context.abort(error.code(), error.details() or "")

    async def _one(
        self,
        call: Any,
        context: grpc.aio.ServicerContext[Any, Any],
        session_id: str,
        address: str,
    ) -> bytes:
        async with contextlib.aclosing(
            self._relay(call, False, context, session_id, address)
        ) as responses:
            async for response in responses:
                return response
        raise AssertionError("a unary hop ended without a response")  # pragma: no cover

    async def unary_unary(
        self,
        address: str,
        method: str,
        request: bytes,
        context: grpc.aio.ServicerContext[Any, Any],
        session_id: str = "",
    ) -> bytes:
        """Forward a unary call; the owner's response bytes."""
        stub = self.channel(address).unary_unary(method, _identity, _identity)
        call = stub(request, **self._call_args(context))
        return await self._one(call, context, session_id, address)

    async def unary_stream(
        self,
        address: str,
        method: str,
        request: bytes,
        context: grpc.aio.ServicerContext[Any, Any],
        session_id: str = "",
    ) -> AsyncIterator[bytes]:
        """Forward a server-streaming call; yields the owner's messages."""
        stub = self.channel(address).unary_stream(method, _identity, _identity)
        call = stub(request, **self._call_args(context))
        async for message in self._relay(call, True, context, session_id, address):
            yield message

    def stream_call(
        self,
        address: str,
        method: str,
        request: bytes,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> Any:
        """A server-streaming hop whose failures (``grpc.aio.AioRpcError``) its caller
        handles: WatchJob following its job from replica to replica."""
        stub = self.channel(address).unary_stream(method, _identity, _identity)
        return stub(request, **self._call_args(context))

    async def stream_unary(
        self,
        address: str,
        method: str,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[Any, Any],
        session_id: str = "",
    ) -> bytes:
        """Forward a client-streaming call; the owner's response bytes."""
        stub = self.channel(address).stream_unary(method, _identity, _identity)
        call = stub(requests, **self._call_args(context))
        return await self._one(call, context, session_id, address)

    async def stream_stream(
        self,
        address: str,
        method: str,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[Any, Any],
        session_id: str = "",
    ) -> AsyncIterator[bytes]:
        """Forward a bidirectional call; yields the owner's messages."""
        stub = self.channel(address).stream_stream(method, _identity, _identity)
        call = stub(requests, **self._call_args(context))
        async for message in self._relay(call, True, context, session_id, address):
            yield message


def _fired(watch: asyncio.Task[None] | None) -> bool:
    """True if the watch cancelled the hop because its owner lost the lease."""
    return (
        watch is not None and watch.done() and not watch.cancelled() and watch.exception() is None
    )


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
