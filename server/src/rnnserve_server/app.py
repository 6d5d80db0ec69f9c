"""Assembles the grpc.aio server: servicer, health, reflection, interceptors, TLS, signals.

Start-up logs ``event=serving port=N`` once the port is bound (port 0 picks a free one) and
writes the port to ``--port-file`` if given. SIGTERM/SIGINT: health goes NOT_SERVING, running
Train streams stop and send a final message, watch streams end, the server stops within the
grace period, every session is checkpointed, and ``serve`` returns 0.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from google.protobuf.message import DecodeError
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

from rnnserve_server import logs, metrics
from rnnserve_server.config import Settings
from rnnserve_server.errors import CheckpointError
from rnnserve_server.registry import Registry
from rnnserve_server.service import Servicer
from rnnserve_server.store import Store

log = logs.get_logger("rnnserve.app")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["RnnService"].full_name
HEALTH_PREFIX = "/grpc.health.v1.Health/"

Behavior = Callable[..., Any]

if TYPE_CHECKING:  # the stubs make these generic; the runtime classes are not subscriptable
    Interceptor = aio.ServerInterceptor[Any, Any]
else:
    Interceptor = aio.ServerInterceptor


def _rebuild(
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


def _behavior_of(handler: grpc.RpcMethodHandler[Any, Any]) -> Behavior:
    for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        fn = getattr(handler, name)
        if fn is not None:
            return fn  # type: ignore[no-any-return]
    raise ValueError("handler without behavior")


def _code_name(context: aio.ServicerContext[Any, Any], exc: BaseException | None) -> str:
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


_INT_CODES = {c.value[0]: c.name for c in grpc.StatusCode}


class LoggingInterceptor(Interceptor):
    """One canonical ``rpc`` line per call: method, session_id, code, duration_ms.

    Health checks log at debug level so probes don't flood the log.
    """

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        behavior = _behavior_of(handler)
        quiet = method.startswith(HEALTH_PREFIX)

        def emit(
            context: aio.ServicerContext[Any, Any],
            start: float,
            exc: BaseException | None,
            **extra: Any,
        ) -> None:
            code = _code_name(context, exc)
            level = "debug" if quiet else ("info" if code in ("OK", "CANCELLED") else "warning")
            fields = structlog.contextvars.get_contextvars()
            getattr(log, level)(
                "rpc",
                method=method,
                session_id=fields.get("session_id", ""),
                code=code,
                duration_ms=round((time.perf_counter() - start) * 1000, 3),
                **extra,
            )

        if not handler.response_streaming:

            async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                structlog.contextvars.clear_contextvars()
                start = time.perf_counter()
                try:
                    response = await behavior(request, context)
                except BaseException as exc:
                    emit(context, start, exc)
                    raise
                emit(context, start, None)
                return response

            return _rebuild(handler, unary)

        async def streaming(
            request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            structlog.contextvars.clear_contextvars()
            start = time.perf_counter()
            sent = 0
            try:
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        sent += 1
                        yield item
                else:  # a coroutine that writes with context.write (health Watch, reflection)
                    await result
            except BaseException as exc:
                emit(context, start, exc, messages=sent)
                raise
            emit(context, start, None, messages=sent)

        return _rebuild(handler, streaming)


class AuthInterceptor(Interceptor):
    """Every RPC but grpc.health.v1 needs ``authorization: Bearer <token>`` with a known token."""

    def __init__(self, tokens: frozenset[str]) -> None:
        self._tokens = [t.encode("utf-8") for t in sorted(tokens)]

    def _allowed(self, metadata: Any) -> bool:
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode("latin-1")
                break
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode("utf-8")
        ok = False
        for known in self._tokens:  # no early exit: the time doesn't say which token matched
            ok |= hmac.compare_digest(given, known)
        return ok

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        if self._allowed(handler_call_details.invocation_metadata):
            return handler

        async def deny(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token: send metadata 'authorization: Bearer <token>' "
                "with a token the server accepts (client: token= or RNNSERVE_TOKEN)",
            )

        return _rebuild(handler, deny)


# gRPC itself refuses messages over this many times --max-message-bytes (with its own wording);
# between 1x and this, RequestGuardInterceptor refuses them with a message naming the setting.
HARD_MESSAGE_FACTOR = 4


class _Refused:
    """Stands in for a request that could not be accepted: the status to answer with."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        self.details = details


class RequestGuardInterceptor(Interceptor):
    """Malformed or oversized request messages get a clear status, not UNKNOWN or INTERNAL.

    gRPC deserializes a request before any handler runs, and answers UNKNOWN when that fails
    (invalid UTF-8 in a string field, e.g. a lone surrogate, or corrupt wire format). This
    wraps the deserializer so such a message becomes INVALID_ARGUMENT, and a message over
    ``--max-message-bytes`` RESOURCE_EXHAUSTED naming the setting. Innermost interceptor:
    the outer ones copy its deserializer.
    """

    def __init__(self, max_message_bytes: int) -> None:
        self.max_bytes = max_message_bytes

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        deserialize = handler.request_deserializer
        behavior = _behavior_of(handler)
        method = handler_call_details.method.rsplit("/", 1)[-1]
        limit = self.max_bytes

        def guarded(data: bytes) -> Any:
            if len(data) > limit:
                return _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the {method} request message ({len(data)} bytes) exceeds the server limit "
                    f"of {limit} bytes; send long text in AppendText chunks, or the operator can "
                    "raise it with --max-message-bytes or RNNSERVE_MAX_MESSAGE_BYTES",
                )
            try:
                return deserialize(data)
            except DecodeError as exc:
                return _Refused(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the {method} request is not a valid message ({exc}); string fields must "
                    "be valid UTF-8 (no lone surrogates)",
                )

        async def check(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Refused):
                await context.abort(request.code, request.details)
            return request

        if handler.request_streaming:

            async def requests(
                iterator: AsyncIterator[Any], context: aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                async for request in iterator:
                    yield await check(request, context)

            if handler.response_streaming:

                async def stream_stream(
                    iterator: AsyncIterator[Any], context: aio.ServicerContext[Any, Any]
                ) -> AsyncIterator[Any]:
                    async for item in behavior(requests(iterator, context), context):
                        yield item

                wrapped: Behavior = stream_stream
            else:

                async def stream_unary(
                    iterator: AsyncIterator[Any], context: aio.ServicerContext[Any, Any]
                ) -> Any:
                    return await behavior(requests(iterator, context), context)

                wrapped = stream_unary
        elif handler.response_streaming:

            async def unary_stream(
                request: Any, context: aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                request = await check(request, context)
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a coroutine that writes with context.write (health Watch)
                    await result

            wrapped = unary_stream
        else:

            async def unary_unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                return await behavior(await check(request, context), context)

            wrapped = unary_unary
        return _rebuild(handler, wrapped, guarded)


def build_interceptors(settings: Settings) -> list[aio.ServerInterceptor[Any, Any]]:
    """Interceptors, outermost first: logging sees every call, auth refusals included; the
    request guard is innermost so every handler gets its deserializer."""
    interceptors: list[aio.ServerInterceptor[Any, Any]] = [LoggingInterceptor()]
    if settings.metrics_port:
        interceptors.append(metrics.MetricsInterceptor())
    tokens = settings.tokens()
    if tokens:
        interceptors.append(AuthInterceptor(tokens))
    interceptors.append(RequestGuardInterceptor(settings.max_message_bytes))
    return interceptors


def _write_port_file(path: Path, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n", encoding="ascii")
    os.replace(tmp, path)


async def serve(settings: Settings) -> int:
    """Run the server until SIGTERM/SIGINT; return the process exit code."""
    store = Store(settings.data_dir)
    registry = Registry(settings, store)
    try:
        await registry.start()
    except CheckpointError as exc:
        log.error("cannot_start", error=str(exc))
        return 2

    options = [
        ("grpc.max_receive_message_length", HARD_MESSAGE_FACTOR * settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
    ]
    server = aio.server(interceptors=build_interceptors(settings), options=options)
    servicer = Servicer(settings, registry)
    pb_grpc.add_RnnServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )

    tls = settings.tls_cert is not None and settings.tls_key is not None
    try:
        if settings.tls_cert is not None and settings.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
            )
            port = server.add_secure_port(settings.address, credentials)
        else:
            port = server.add_insecure_port(settings.address)
    except (RuntimeError, OSError) as exc:
        log.error("cannot_bind", address=settings.address, error=str(exc))
        await registry.close()
        return 2
    if not port:
        log.error("cannot_bind", address=settings.address, error="port unavailable")
        await registry.close()
        return 2

    metrics_server = None
    if settings.metrics_port:
        try:
            metrics_server = metrics.start(settings.address, settings.metrics_port, registry)
        except OSError as exc:
            log.error("cannot_bind_metrics", port=settings.metrics_port, error=str(exc))
            await registry.close()
            return 2
        log.info("metrics_serving", port=metrics_server.port, path="/metrics")

    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving",
        port=port,
        address=settings.address,
        tls=tls,
        auth=bool(settings.tokens()),
        data_dir=str(settings.data_dir),
        pid=os.getpid(),
    )
    if settings.port_file is not None:
        _write_port_file(settings.port_file, port)

    stop = asyncio.Event()
    received: list[str] = []
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        if stop.is_set():
            log.warning("second_signal", signal=sig.name, action="exiting now")
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    await stop.wait()
    log.info("shutting_down", signal=received[0] if received else "", grace=settings.grace)
    await health_servicer.enter_graceful_shutdown()
    registry.begin_shutdown()
    await server.stop(settings.grace)
    await registry.close()
    if metrics_server is not None:
        metrics_server.close()
    log.info("stopped")
    return 0
