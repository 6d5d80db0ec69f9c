"""Routing in cluster mode: a server interceptor that sends each session call to the
replica owning the session.

For a method whose request names a session (``session_id``, the first message's for client
streams): if this replica holds the session's lease, the call is served here; if no one does,
this replica takes the lease, loads the session's latest checkpoint from the shared directory
into its registry and serves it; if another replica holds it, the whole call is forwarded
there as bytes (:mod:`rnnserve_server.cluster.forward`). Routing reads the request's own
``session_id`` (or the session in a job's ``name``); the client's ``x-session-id`` metadata is
only a hint for a load balancer in front (it may name another session: it is never trusted
here). A forwarded call is never forwarded again: if the lease moved meanwhile, the caller
gets UNAVAILABLE (OWNER_UNAVAILABLE) and retries. WatchJob from a client follows its job
from replica to replica (:meth:`Router._follow_job`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio
from redis.exceptions import RedisError
from rnnserve.v1 import rnn_service_pb2 as pb

from rnnserve_server.api import status
from rnnserve_server.api.interceptors import Refused, guard_deserializer, rebuild
from rnnserve_server.cluster.forward import (
    FORWARDED_KEY,
    Forwarder,
    Kind,
    forwarded,
    hop_failed,
    method_kinds,
)
from rnnserve_server.cluster.security import from_peer
from rnnserve_server.errors import OwnerUnavailableError, StorageError
from rnnserve_server.usecases.training import JOB_NAME_RE

SERVICE = pb.DESCRIPTOR.services_by_name["RnnService"]
LIST_METHOD = f"/{SERVICE.full_name}/ListSessions"
WATCH_METHOD = f"/{SERVICE.full_name}/WatchLoss"
WATCH_JOB_METHOD = f"/{SERVICE.full_name}/WatchJob"
_ACTIVE_JOB = (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
# Methods whose request carries no session id: served by whichever replica gets them.
_UNROUTED = {LIST_METHOD}

if TYPE_CHECKING:
    Interceptor = aio.ServerInterceptor[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]]
else:
    Interceptor = aio.ServerInterceptor

# Decides where a session's call runs: None = here (the session is active here now), else
# the owner's address. ``forwarded``: the call came from another replica (never forward it).
Route = Callable[[str, bool], Awaitable[str | None]]
# Called when a routed call served here ended (the session may be released if it is gone).
Done = Callable[[str], None]


class OwnerMovedError(Exception):
    """A forwarded call reached a replica that no longer owns the session."""


def session_of(request: Any) -> str:
    """The session a request is about: its ``session_id``, or the session in a job's
    ``name`` (sessions/{session}/jobs/{job}); "" if neither (served where it lands)."""
    session_id = str(getattr(request, "session_id", "") or "")
    if session_id:
        return session_id
    match = JOB_NAME_RE.fullmatch(str(getattr(request, "name", "") or ""))
    return match.group(1) if match is not None else ""


class Router(Interceptor):
    """Serve here or forward, per call, by session ownership."""

    def __init__(
        self,
        route: Route,
        done: Done,
        forwarder: Forwarder,
        max_bytes: int,
        list_sessions: Callable[[Any, Any], Awaitable[Any]],
        watches_locally: Callable[[str, int], bool] | None = None,
        watch_stream: Callable[[str, int], Awaitable[AsyncIterator[Any] | None]] | None = None,
        *,
        peers_only: bool = False,
    ) -> None:
        # Mutual TLS between replicas: the forwarded marker counts only on a call from a
        # peer (a verified peer certificate), anything else carrying it is refused.
        self.peers_only = peers_only
        self.list_sessions = list_sessions
        self.watches_locally = watches_locally
        self.watch_stream = watch_stream
        self.route = route
        self.done = done
        self.forwarder = forwarder
        self.max_bytes = max_bytes
        self.kinds = method_kinds(SERVICE)
        self._wrapped: dict[str, tuple[Any, Any]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        kind = self.kinds.get(method)
        if handler is None or kind is None:
            return handler
        entry = self._wrapped.get(method)
        if entry is None or entry[0] is not handler:
            wrapped = (
                self._wrap_list(handler)
                if method in _UNROUTED
                else self._wrap(method, kind, handler)
            )
            entry = (handler, wrapped)
            self._wrapped[method] = entry
        return entry[1]  # type: ignore[no-any-return]

    async def _where(self, session_id: str, context: aio.ServicerContext[Any, Any]) -> str | None:
        hop = forwarded(context)
        if hop and self.peers_only and not from_peer(context):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{FORWARDED_KEY} is for calls between replicas: it is accepted only on the "
                "peer port (--peer-address) from a replica whose certificate --peer-tls-ca "
                "signed; leave it out of client calls",
            )
        try:
            return await self.route(session_id, hop)
        except OwnerMovedError as exc:
            moved = OwnerUnavailableError(str(exc), session_id=session_id, retry_seconds=0.0)
            await status.abort(context, moved)
        except TimeoutError:
            changing = OwnerUnavailableError(
                f"session {session_id!r} is changing owner; retry in a moment",
                session_id=session_id,
                retry_seconds=self.forwarder.retry_seconds,
            )
            await status.abort(context, changing)
        except (RedisError, OSError):
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the cluster coordinator (Redis) is unreachable; retry in a moment",
            )
        except aio.AbortError:
            raise
        except Exception as exc:
            await status.abort(context, exc)
        raise AssertionError("abort returned")  # pragma: no cover

    async def _forward(
        self, call: Callable[..., Awaitable[Any]], *args: Any, context: Any, sid: str
    ) -> Any:
        """A unary-response forward; the owner not answering ends the call with its status."""
        try:
            return await call(*args, context, sid)
        except OwnerUnavailableError as exc:
            await status.abort(context, exc)

    async def _forward_stream(
        self, call: Callable[..., AsyncIterator[Any]], *args: Any, context: Any, sid: str
    ) -> AsyncIterator[Any]:
        """A streaming-response forward, as :meth:`_forward`."""
        try:
            async for message in call(*args, context, sid):
                yield message
        except OwnerUnavailableError as exc:
            await status.abort(context, exc)

    def _wrap_list(
        self, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        list_sessions = self.list_sessions

        async def behavior(request: Any, context: Any) -> Any:
            try:
                return await list_sessions(request, context)
            except aio.AbortError:
                raise
            except Exception as exc:
                await status.abort(context, exc)

        return rebuild(handler, behavior)

    def _wrap(self, method: str, kind: Kind, h: grpc.RpcMethodHandler[Any, Any]) -> Any:
        handler: Any = h  # grpc's stubs type the behaviours loosely
        guarded = guard_deserializer(handler.request_deserializer, method, self.max_bytes)

        async def decode(raw: bytes, context: Any) -> Any:
            request = guarded(raw)
            if isinstance(request, Refused):  # oversized or malformed: the guard's status
                await status.abort(context, request.error)
            return request

        serialize = handler.response_serializer

        def passthrough(message: Any) -> bytes:
            # Forwarded answers are already bytes; local ones are messages.
            return message if isinstance(message, bytes) else serialize(message)

        fwd = self.forwarder
        done = self.done
        sid_of = session_of

        if kind == "unary_unary":
            inner = handler.unary_unary

            async def uu(raw: bytes, context: Any) -> Any:
                request = await decode(raw, context)
                sid = sid_of(request)
                owner = await self._where(sid, context) if sid else None
                if owner is not None:
                    return await self._forward(
                        fwd.unary_unary, owner, method, raw, context=context, sid=sid
                    )
                try:
                    return await inner(request, context)
                finally:
                    if sid:
                        done(sid)

            behavior: Any = uu
        elif kind == "unary_stream":
            inner = handler.unary_stream

            watch_stream = self.watch_stream if method == WATCH_METHOD else None
            watches_locally = self.watches_locally or (lambda sid, from_step: True)

            async def us(raw: bytes, context: Any) -> AsyncIterator[Any]:
                request = await decode(raw, context)
                sid = sid_of(request)
                # WatchLoss on a non-owner follows the session's Redis stream: it sees every
                # point whoever trains it, and survives the owner's death.
                if (
                    watch_stream is not None
                    and sid
                    and request.from_step >= 0
                    and not watches_locally(sid, int(request.from_step))
                ):
                    try:
                        source = await watch_stream(sid, int(request.from_step))
                    except (RedisError, OSError):
                        source = None
                    if source is not None:
                        try:
                            async for message in source:
                                yield message
                        except StorageError as exc:  # Redis away: UNAVAILABLE, watch again
                            await status.abort(context, exc)
                        return
                if method == WATCH_JOB_METHOD and sid and not forwarded(context):
                    async for message in self._follow_job(raw, request, context, inner, sid):
                        yield message
                    return
                owner = await self._where(sid, context) if sid else None
                if owner is not None:
                    relayed = self._forward_stream(
                        fwd.unary_stream, owner, method, raw, context=context, sid=sid
                    )
                    async for message in relayed:
                        yield message
                    return
                try:
                    async for message in inner(request, context):
                        yield message
                finally:
                    if sid:
                        done(sid)

            behavior = us
        else:
            inner = handler.stream_unary if kind == "stream_unary" else handler.stream_stream

            async def first_and_rest(
                requests: AsyncIterator[bytes],
            ) -> tuple[bytes | None, AsyncIterator[bytes]]:
                iterator = requests.__aiter__()
                try:
                    first = await iterator.__anext__()
                except StopAsyncIteration:
                    return None, iterator
                return first, iterator

            async def chained(
                first: bytes | None, rest: AsyncIterator[bytes]
            ) -> AsyncIterator[bytes]:
                if first is not None:
                    yield first
                async for item in rest:
                    yield item

            async def decoded(
                first: Any, rest: AsyncIterator[bytes], context: Any
            ) -> AsyncIterator[Any]:
                if first is not None:
                    yield first
                async for item in rest:
                    yield await decode(item, context)

            async def setup(
                requests: AsyncIterator[bytes], context: Any
            ) -> tuple[str | None, str, Any, AsyncIterator[bytes]]:
                raw_first, rest = await first_and_rest(requests)
                first = await decode(raw_first, context) if raw_first is not None else None
                sid = sid_of(first) if first is not None else ""
                owner = await self._where(sid, context) if sid else None
                if owner is not None:
                    return owner, sid, None, chained(raw_first, rest)
                return None, sid, decoded(first, rest, context), rest

            if kind == "stream_unary":

                async def su(requests: AsyncIterator[bytes], context: Any) -> Any:
                    owner, sid, local, raw = await setup(requests, context)
                    if owner is not None:
                        return await self._forward(
                            fwd.stream_unary, owner, method, raw, context=context, sid=sid
                        )
                    try:
                        return await inner(local, context)
                    finally:
                        if sid:
                            done(sid)

                behavior = su
            else:

                async def ss(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[Any]:
                    owner, sid, local, raw = await setup(requests, context)
                    if owner is not None:
                        relayed = self._forward_stream(
                            fwd.stream_stream, owner, method, raw, context=context, sid=sid
                        )
                        async for message in relayed:
                            yield message
                        return
                    try:
                        async for message in inner(local, context):
                            yield message
                    finally:
                        if sid:
                            done(sid)

                behavior = ss
        built: Any = rebuild(handler, behavior)
        # Raw bytes in (decoded here, after routing); bytes or messages out.
        return type(built)(
            built.request_streaming,
            built.response_streaming,
            None,
            passthrough,
            built.unary_unary,
            built.unary_stream,
            built.stream_unary,
            built.stream_stream,
        )

    async def _follow_job(
        self, raw: bytes, request: Any, context: Any, inner: Any, sid: str
    ) -> AsyncIterator[Any]:
        """WatchJob from a client: relay the job's messages from its owner (here or
        forwarded); when the job moves (its owner died, drained or handed it off) follow it
        to the new owner. The first message from a new owner that resumed behind what this
        watcher saw carries ``restored_at_step`` (one announced rollback)."""
        seen = -1  # the furthest step this watcher was shown
        patience = 9 * self.forwarder.retry_seconds + 5.0  # about 3 lease TTLs without news
        deadline = time.monotonic() + patience
        legs = 0
        while True:
            owner = await self._where(sid, context)
            call = None
            if owner is None:
                source: AsyncIterator[Any] = self._local(inner(request, context), sid)
            else:
                call = self.forwarder.stream_call(owner, WATCH_JOB_METHOD, raw, context)
                source = call.__aiter__()
            fresh = True
            try:
                async for item in source:
                    message = (
                        pb.WatchJobResponse.FromString(item) if isinstance(item, bytes) else item
                    )
                    active = message.job.state in _ACTIVE_JOB
                    if fresh:
                        fresh = False
                        back = (
                            message.restored_at_step
                            if message.HasField("restored_at_step")
                            else message.job.step
                        )
                        if legs and 0 <= back < seen:
                            message.restored_at_step = seen = back
                        else:
                            message.ClearField("restored_at_step")
                    if active and message.progress.stop_reason:
                        continue  # it left that replica: not its end
                    step = message.progress.step if message.HasField("progress") else -1
                    step = max(step, message.job.step)
                    if step > seen:
                        deadline = time.monotonic() + patience
                        seen = step
                    yield message
                    if not active:
                        return
            except grpc.aio.AioRpcError as error:  # the owner's own answers are the caller's
                if not hop_failed(error) and error.code() != grpc.StatusCode.UNAVAILABLE:
                    context.set_trailing_metadata(tuple(error.trailing_metadata() or ()))
                    await context.abort(error.code(), error.details() or "")
            finally:
                if call is not None:
                    call.cancel()
            legs += 1
            if time.monotonic() > deadline:
                moving = OwnerUnavailableError(
                    f"the job of session {sid!r} is moving between replicas and no replica "
                    "runs it yet; watch it again in a moment",
                    session_id=sid,
                    retry_seconds=self.forwarder.retry_seconds,
                )
                await status.abort(context, moving)
            await asyncio.sleep(self.forwarder.retry_seconds)

    async def _local(self, messages: AsyncIterator[Any], sid: str) -> AsyncIterator[Any]:
        """A call's messages served here; ``done`` once it ends."""
        try:
            async for message in messages:
                yield message
        finally:
            self.done(sid)


def lock_for(locks: dict[str, asyncio.Lock], key: str) -> asyncio.Lock:
    """The lock serialising activation of one session on this replica."""
    return locks.setdefault(key, asyncio.Lock())
