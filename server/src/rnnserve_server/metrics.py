"""Prometheus metrics, served over HTTP at ``/metrics`` when ``--metrics-port`` is set.

Everything lives in one dedicated ``CollectorRegistry`` (:data:`REGISTRY`), never the
prometheus-client default, so nothing a library registers globally leaks in:

- ``rnnserve_rpcs_total{service,method,code}``: finished RPCs by gRPC status code name;
- ``rnnserve_rpc_duration_seconds{service,method}``: histogram of RPC durations (for a stream,
  from the call to its last message);
- ``rnnserve_active_streams{service,method}``: streaming RPCs in flight (Train, WatchLoss, ...);
- ``rnnserve_sessions``, ``rnnserve_sessions_resident``, ``rnnserve_sessions_on_disk``: sessions
  known, with their model in memory, with a checkpoint file in the data directory;
- ``rnnserve_training_updates_total``, ``rnnserve_training_chars_total``: optimizer updates
  applied and characters trained on (``rate(...[1m])`` is updates/s and chars/s);
- ``rnnserve_checkpoints_total{result}`` (ok / error) and ``rnnserve_checkpoint_duration_seconds``;
- ``process_*`` and ``python_info``: the standard process and platform collectors.

The RPC metrics come from :class:`MetricsInterceptor` (added by app.py only when metrics are
on); training and checkpoint counters are bumped by service.py and store.py whether or not they
are served (an increment costs well under a microsecond).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
import prometheus_client
from grpc import aio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from rnnserve_server.registry import Registry

    # The stubs make it generic; the runtime class is not subscriptable.
    Interceptor = aio.ServerInterceptor[Any, Any]
else:
    Interceptor = aio.ServerInterceptor

# The *_created series double every counter's output and nobody graphs them.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# From a health check (~1 ms) to a long Train stream (minutes).
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip
CHECKPOINT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

RPCS = Counter(
    "rnnserve_rpcs",
    "Finished RPCs by service, method and gRPC status code.",
    ["service", "method", "code"],
    registry=REGISTRY,
)
RPC_DURATION = Histogram(
    "rnnserve_rpc_duration_seconds",
    "RPC duration in seconds; for streams, until the last message.",
    ["service", "method"],
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
ACTIVE_STREAMS = Gauge(
    "rnnserve_active_streams",
    "Streaming RPCs in flight.",
    ["service", "method"],
    registry=REGISTRY,
)
TRAINING_UPDATES = Counter(
    "rnnserve_training_updates",
    "Optimizer updates applied (Step and Train), all sessions.",
    registry=REGISTRY,
)
TRAINING_CHARS = Counter(
    "rnnserve_training_chars",
    "Characters trained on (batch_size * seq_length per corpus update), all sessions.",
    registry=REGISTRY,
)
CHECKPOINTS = Counter(
    "rnnserve_checkpoints",
    "Checkpoint writes by result (ok, error).",
    ["result"],
    registry=REGISTRY,
)
CHECKPOINT_DURATION = Histogram(
    "rnnserve_checkpoint_duration_seconds",
    "Time to write one checkpoint atomically (serialize, fsync, rename).",
    buckets=CHECKPOINT_BUCKETS,
    registry=REGISTRY,
)
for _result in ("ok", "error"):
    CHECKPOINTS.labels(result=_result)  # both series exist from the start, at 0


def record_training(updates: int, chars: int) -> None:
    """Count ``updates`` optimizer updates over ``chars`` characters."""
    if updates > 0:
        TRAINING_UPDATES.inc(updates)
    if chars > 0:
        TRAINING_CHARS.inc(chars)


def record_checkpoint(seconds: float, ok: bool = True) -> None:
    """Count one checkpoint write; a successful one also goes into the duration histogram."""
    CHECKPOINTS.labels(result="ok" if ok else "error").inc()
    if ok:
        CHECKPOINT_DURATION.observe(seconds)


# ----- RPCs ------------------------------------------------------------------------------------

_INT_CODES = {c.value[0]: c.name for c in grpc.StatusCode}


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def _code_name(context: aio.ServicerContext[Any, Any], exc: BaseException | None) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        return _INT_CODES.get(code, str(code))
    return "OK" if exc is None else "UNKNOWN"


def _behavior_of(handler: grpc.RpcMethodHandler[Any, Any]) -> Callable[..., Any]:
    for name in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        fn = getattr(handler, name)
        if fn is not None:
            return fn  # type: ignore[no-any-return]
    raise ValueError("handler without behavior")


def _rebuild(
    handler: grpc.RpcMethodHandler[Any, Any], behavior: Callable[..., Any]
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind and (de)serializers as ``handler`` calling ``behavior``."""
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
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class MetricsInterceptor(Interceptor):
    """Counts and times every RPC by method and status code; tracks streams in flight."""

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED itself
            return handler
        service, method = split_method(handler_call_details.method)
        behavior = _behavior_of(handler)
        duration = RPC_DURATION.labels(service=service, method=method)

        def done(
            context: aio.ServicerContext[Any, Any], start: float, exc: BaseException | None
        ) -> None:
            RPCS.labels(service=service, method=method, code=_code_name(context, exc)).inc()
            duration.observe(time.perf_counter() - start)

        # Client-streaming calls (AppendText) are streams in flight too.
        active = (
            ACTIVE_STREAMS.labels(service=service, method=method)
            if handler.request_streaming or handler.response_streaming
            else None
        )

        if not handler.response_streaming:

            async def unary(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
                start = time.perf_counter()
                if active is not None:
                    active.inc()
                try:
                    response = await behavior(request, context)
                except BaseException as exc:
                    done(context, start, exc)
                    raise
                finally:
                    if active is not None:
                        active.dec()
                done(context, start, None)
                return response

            return _rebuild(handler, unary)

        assert active is not None

        async def streaming(
            request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            start = time.perf_counter()
            active.inc()
            try:
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a coroutine that writes with context.write (health Watch, reflection)
                    await result
            except BaseException as exc:
                done(context, start, exc)
                raise
            finally:
                active.dec()
            done(context, start, None)

        return _rebuild(handler, streaming)


# ----- sessions --------------------------------------------------------------------------------


class SessionCollector(Collector):
    """Session gauges computed at scrape time from the registries of the running servers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._registries: list[Registry] = []

    def add(self, registry: Registry) -> None:
        """Include ``registry``'s sessions in the gauges."""
        with self._lock:
            self._registries.append(registry)

    def remove(self, registry: Registry) -> None:
        """Stop counting ``registry`` (its server stopped)."""
        with self._lock:
            if registry in self._registries:
                self._registries.remove(registry)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """Runs in the HTTP server's thread: only reads, copying containers before iterating."""
        known = resident = on_disk = 0
        with self._lock:
            registries = list(self._registries)
        for registry in registries:
            sessions = list(registry.sessions.values())
            known += len(sessions)
            resident += sum(1 for s in sessions if s.resident)
            with contextlib.suppress(OSError):  # data dir gone: report what can be seen
                on_disk += len(registry.store.scan()[0])
        yield GaugeMetricFamily("rnnserve_sessions", "Sessions known to the server.", value=known)
        yield GaugeMetricFamily(
            "rnnserve_sessions_resident", "Sessions with their model in memory.", value=resident
        )
        yield GaugeMetricFamily(
            "rnnserve_sessions_on_disk",
            "Sessions with a checkpoint file in the data directory.",
            value=on_disk,
        )


SESSIONS = SessionCollector()
REGISTRY.register(SESSIONS)


# ----- HTTP endpoint ---------------------------------------------------------------------------


def metrics_host(address: str) -> str:
    """The host part of a gRPC ``host:port`` address: metrics listen where gRPC does.

    ``[::]:50051`` -> ``::``; ``0.0.0.0:50051`` -> ``0.0.0.0``; ``:50051`` -> ``0.0.0.0``.
    """
    host, _, _ = address.rpartition(":")
    host = host.strip("[]")
    return host or "0.0.0.0"


class MetricsServer:
    """The ``/metrics`` HTTP endpoint of one gRPC server, and its session gauges."""

    def __init__(self, registry: Registry, host: str, port: int) -> None:
        self._registry = registry
        self._http: WSGIServer
        self._http, self._thread = prometheus_client.start_http_server(
            port, addr=host, registry=REGISTRY
        )
        self.port: int = self._http.server_port
        SESSIONS.add(registry)

    def close(self) -> None:
        """Stop serving and stop counting this server's sessions."""
        SESSIONS.remove(self._registry)
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(5)


def start(address: str, port: int, registry: Registry) -> MetricsServer:
    """Serve ``/metrics`` on ``port`` at the host of the gRPC ``address``.

    Raises OSError when the port cannot be bound.
    """
    return MetricsServer(registry, metrics_host(address), port)
