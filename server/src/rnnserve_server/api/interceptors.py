"""The grpc.aio interceptor: per-RPC observation (log line + metrics), auth, request guard.

One interceptor does all three, so a call pays for one ``intercept_service`` and one wrapping
coroutine, not three. :class:`ObservingInterceptor` wraps the handler grpc found for a method
(:func:`rebuild`) on the method's first call and reuses the wrapped handler for every later
call; auth, which depends on each call's metadata, picks between the wrapped handler and a
wrapped refusal. A call sees what three nested interceptors gave it before: observation
outermost (it sees every call, auth refusals included), then auth, then the request guard.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from google.protobuf.message import DecodeError
from grpc import aio

from rnnserve_server import logs, metrics
from rnnserve_server.api import status
from rnnserve_server.errors import (
    DomainError,
    InvalidArgumentError,
    LimitExceededError,
    UnauthenticatedError,
)

# The rpc line keeps the logger name it had when app.py wrote it: log queries filter on it.
log = logs.get_logger("rnnserve.app")

HEALTH_PREFIX = "/grpc.health.v1.Health/"

Behavior = Callable[..., Any]

if TYPE_CHECKING:  # the stubs make these generic; the runtime classes are not subscriptable
    Interceptor = aio.ServerInterceptor[Any, Any]
    Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]]
else:
    Interceptor = aio.ServerInterceptor


def behavior_of(handler: grpc.RpcMethodHandler[Any, Any]) -> Behavior:
    """The one behaviour (unary_unary, unary_stream, ...) a method handler carries."""
    for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        fn = getattr(handler, name)
        if fn is not None:
            return fn  # type: ignore[no-any-return]
    raise ValueError("handler without behavior")


def rebuild(
    handler: grpc.RpcMethodHandler[Any, Any],
    behavior: Behavior,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind and (de)serializers as ``handler`` calling ``behavior``
    (with ``request_deserializer`` instead of the handler's when given)."""
    kind: Callable[..., grpc.RpcMethodHandler[Any, Any]]
    if handler.request_streaming and handler.response_streaming:
        kind = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        kind = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        kind = grpc.unary_stream_rpc_method_handler
    else:
        kind = grpc.unary_unary_rpc_method_handler
    return kind(
        behavior,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


_INT_CODES = {c.value[0]: c.name for c in grpc.StatusCode}


def code_name(context: aio.ServicerContext[Any, Any], exc: BaseException | None) -> str:
    """The status code name a call ended with, ``exc`` being what its behaviour raised."""
    # A stream the client cancelled is closed with GeneratorExit (the aio server calls
    # aclose() on the handler's generator), not CancelledError: that is CANCELLED, not UNKNOWN.
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        return _INT_CODES.get(code, str(code))
    return "OK" if exc is None else "UNKNOWN"


class ObservingInterceptor(Interceptor):
    """Every call: the request guard (:func:`guard_deserializer`), auth when ``tokens`` are set
    (every RPC but grpc.health.v1 needs ``authorization: Bearer <token>`` with a known token),
    and timing and the status code for the canonical ``rpc`` line (method, session_id, code,
    duration_ms; streams add messages) and, with ``record_metrics``, the RPC metrics, counting
    streaming calls in flight.

    Health checks log at debug level so probes don't flood the log.
    """

    def __init__(
        self,
        max_message_bytes: int,
        tokens: frozenset[str] = frozenset(),
        record_metrics: bool = False,
    ) -> None:
        self.max_bytes = max_message_bytes
        self._tokens = [t.encode("utf-8") for t in sorted(tokens)]
        self.record_metrics = record_metrics
        # method -> (grpc's handler, the wrapped handler, the wrapped refusal or None). grpc
        # returns the same handler object for a method on every call; if it ever did not, the
        # identity check below re-wraps.
        self._wrapped: dict[str, tuple[Any, Any, Any]] = {}

    def _allowed(self, metadata: Any) -> bool:
        token = bearer_token(metadata)
        if not token:
            return False
        given = token.encode("utf-8")
        ok = False
        for known in self._tokens:  # no early exit: the time doesn't say which token matched
            ok |= hmac.compare_digest(given, known)
        return ok

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        full_method = handler_call_details.method
        entry = self._wrapped.get(full_method)
        if entry is None or entry[0] is not handler:
            entry = (handler, *self._wrap(full_method, handler))
            self._wrapped[full_method] = entry
        denied = entry[2]
        if denied is not None and not self._allowed(handler_call_details.invocation_metadata):
            return denied
        return entry[1]

    def _wrap(
        self, full_method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any] | None]:
        """The handler every call of ``full_method`` gets, and the one a call without a valid
        token gets (None when auth is off or the method is a health check)."""
        deserializer = handler.request_deserializer
        guarded = (
            None
            if deserializer is None
            else guard_deserializer(deserializer, full_method, self.max_bytes)
        )
        allowed = rebuild(
            handler, self._observe(full_method, handler, behavior_of(handler)), guarded
        )
        if not self._tokens or full_method.startswith(HEALTH_PREFIX):
            return allowed, None

        async def deny(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            await status.abort(
                context,
                UnauthenticatedError(
                    "missing or invalid bearer token: send metadata 'authorization: Bearer "
                    "<token>' with a token the server accepts (client: token= or RNNSERVE_TOKEN)"
                ),
            )

        # Observed as the method's kind, like any call; the refusal reads no request.
        denied = rebuild(handler, self._observe(full_method, handler, deny, refusal=True), guarded)
        return allowed, denied

    def _observe(
        self,
        full_method: str,
        handler: grpc.RpcMethodHandler[Any, Any],
        behavior: Behavior,
        refusal: bool = False,
    ) -> Behavior:
        """``behavior`` with the guard's check (unless ``refusal``: an auth refusal answers
        UNAUTHENTICATED whatever the request), timing, the rpc line and the metrics."""
        service, method = metrics.split_method(full_method)
        auth = bool(self._tokens)
        quiet = full_method.startswith(HEALTH_PREFIX)
        record_metrics = self.record_metrics
        rpc_metrics = (
            metrics.RpcMetrics(
                metrics.grpc_type(handler.request_streaming, handler.response_streaming),
                service,
                method,
            )
            if record_metrics
            else None
        )
        # Client-streaming calls (AppendText) are streams in flight too.
        active = (
            metrics.ACTIVE_STREAMS.labels(grpc_service=service, grpc_method=method)
            if record_metrics and (handler.request_streaming or handler.response_streaming)
            else None
        )

        # One request message per call, counted at its start, unless the requests stream in
        # (then _checking_requests counts each).
        received_at_start = rpc_metrics is not None and not handler.request_streaming

        def begin() -> float:
            structlog.contextvars.clear_contextvars()
            if rpc_metrics is not None:
                rpc_metrics.started.inc()
                if received_at_start:
                    rpc_metrics.received.inc()
            if active is not None:
                active.inc()
            return time.perf_counter()

        def finish(
            context: aio.ServicerContext[Any, Any],
            start: float,
            exc: BaseException | None,
            **extra: Any,
        ) -> None:
            seconds = time.perf_counter() - start
            if active is not None:
                active.dec()
            code = code_name(context, exc)
            level = "debug" if quiet else ("info" if code in ("OK", "CANCELLED") else "warning")
            if rpc_metrics is not None:  # before the log line: a reader of it sees the metric
                sent = extra.get("messages", 1 if code == "OK" else 0)
                rpc_metrics.finished(code, seconds, sent)
            fields = structlog.contextvars.get_contextvars()
            getattr(log, level)(
                "rpc",
                method=full_method,
                session_id=fields.get("session_id", ""),
                code=code,
                duration_ms=round(seconds * 1000, 3),
                **extra,
            )

        if refusal:
            inner: Behavior = behavior
        elif handler.request_streaming:
            inner = _checking_requests(
                behavior, rpc_metrics.received if rpc_metrics is not None else None
            )
        else:
            inner = _checking_request(behavior, handler.response_streaming)

        if not handler.response_streaming:

            async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                start = begin()
                if auth:
                    label_caller(context)
                try:
                    response = await inner(request, context)
                except BaseException as exc:
                    finish(context, start, exc)
                    raise
                finish(context, start, None)
                return response

            return unary

        async def streaming(
            request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            start = begin()
            if auth:
                label_caller(context)
            sent = 0
            try:
                result = inner(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        sent += 1
                        yield item
                else:  # a coroutine that writes with context.write (health Watch, reflection)
                    await result
            except BaseException as exc:
                finish(context, start, exc, messages=sent)
                raise
            finish(context, start, None, messages=sent)

        return streaming


def _checking_request(behavior: Behavior, response_streaming: bool) -> Behavior:
    """A unary-request behaviour that first aborts a call whose request the guard refused.
    Unary responses: one coroutine (the observer awaits it). Streamed responses: the handler's
    own result (async generator or coroutine), so the observer can count the messages."""
    if not response_streaming:

        async def unary_unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, Refused):
                await status.abort(context, request.error)
            return await behavior(request, context)

        return unary_unary

    def unary_stream(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, Refused):
            return _abort(request, context)
        return behavior(request, context)

    return unary_stream


async def _abort(refused: Refused, context: aio.ServicerContext[Any, Any]) -> None:
    await status.abort(context, refused.error)


def _checking_requests(behavior: Behavior, received: Any = None) -> Behavior:
    """A streaming-request behaviour whose request iterator aborts the call at the first
    message the guard refused, counting each message on ``received`` (a metric) if given."""

    def wrapped(iterator: AsyncIterator[Any], context: aio.ServicerContext[Any, Any]) -> Any:
        async def requests() -> AsyncIterator[Any]:
            async for request in iterator:
                if received is not None:
                    received.inc()
                if isinstance(request, Refused):
                    await status.abort(context, request.error)
                yield request

        return behavior(requests(), context)

    return wrapped


# gRPC itself refuses messages over this many times --max-message-bytes (with its own wording);
# between 1x and this, the request guard refuses them with a message naming the setting.
HARD_MESSAGE_FACTOR = 4


class Refused:
    """Stands in for a request that could not be accepted: the status to answer with."""

    def __init__(self, error: DomainError) -> None:
        self.error = error


def guard_deserializer(
    deserialize: Callable[[bytes], Any], full_method: str, limit: int
) -> Callable[[bytes], Any]:
    """The request guard: malformed or oversized request messages get a clear status, not
    UNKNOWN or INTERNAL.

    gRPC deserializes a request before any handler runs, and answers UNKNOWN when that fails
    (invalid UTF-8 in a string field, e.g. a lone surrogate, or corrupt wire format). The
    returned deserializer turns such a message into a refusal with INVALID_ARGUMENT, and a
    message over ``limit`` (``--max-message-bytes``) into one with RESOURCE_EXHAUSTED naming
    the setting; the observed behaviour aborts the call with it before the handler runs.
    """
    method = full_method.rsplit("/", 1)[-1]

    def guarded(data: bytes) -> Any:
        if len(data) > limit:
            return Refused(
                LimitExceededError(
                    f"the {method} request message ({len(data)} bytes) exceeds the server "
                    f"limit of {limit} bytes; send long text in AppendText chunks, or the "
                    "operator can raise it with --max-message-bytes or RNNSERVE_MAX_MESSAGE_BYTES",
                    setting="max_message_bytes",
                    limit=limit,
                    value=len(data),
                )
            )
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Refused(
                InvalidArgumentError(
                    f"the {method} request is not a valid message ({exc}); string fields must "
                    "be valid UTF-8 (no lone surrogates)"
                )
            )

    return guarded


# A label of the caller's bearer token (never the token): "token:" and the first 8 hex digits
# of its SHA-256; "" without auth. Set for each call by the interceptor, read by handlers
# (StartJob's started_by).
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("rnnserve_caller", default="")


def bearer_token(metadata: Any) -> str:
    """The bearer token in a call's metadata, or ""."""
    header = ""
    for key, value in metadata or ():
        if key == "authorization":
            header = value if isinstance(value, str) else value.decode("latin-1")
            break
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def token_label(token: str) -> str:
    """The label of a token that logs and replies may show."""
    return "token:" + hashlib.sha256(token.encode("utf-8")).hexdigest()[:8] if token else ""


def label_caller(context: aio.ServicerContext[Any, Any]) -> None:
    """Set CALLER for this call from its token (the call passed auth if auth is on)."""
    CALLER.set(token_label(bearer_token(context.invocation_metadata())))
