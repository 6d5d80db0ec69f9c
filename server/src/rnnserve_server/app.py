"""Assembles the grpc.aio server: servicer, health, reflection, interceptors, TLS, signals.

Start-up logs ``event=serving port=N`` once the port is bound (port 0 picks a free one) and
writes the port to ``--port-file`` if given. SIGTERM/SIGINT: health goes NOT_SERVING, running
Train streams stop and send a final message, watch streams end, the server stops within the
grace period, every session is checkpointed, and ``serve`` returns 0 (1 if some session's
changes could not be checkpointed). While checkpoints fail (full disk, unwritable or deleted
data directory) health is NOT_SERVING; it turns SERVING again once they succeed.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

from rnnserve_server import logs, metrics
from rnnserve_server.api.interceptors import HARD_MESSAGE_FACTOR, ObservingInterceptor
from rnnserve_server.api.servicer import Servicer
from rnnserve_server.cluster.security import PeerTls
from rnnserve_server.cluster.wiring import ClusterNode
from rnnserve_server.config import Settings
from rnnserve_server.errors import CheckpointError
from rnnserve_server.sessions.registry import Registry
from rnnserve_server.startup import (
    StartupError,
    TlsFiles,
    check_data_dir,
    check_redis,
    load_peer_tls,
    load_redis_access,
    load_tls,
)
from rnnserve_server.storage.local_store import LocalStore
from rnnserve_server.usecases.session_service import SessionService

log = logs.get_logger("rnnserve.app")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["RnnService"].full_name


def build_interceptors(settings: Settings) -> list[aio.ServerInterceptor[Any, Any]]:
    """The one interceptor: request guard, auth when tokens are set, the rpc log line and the
    RPC metrics when they are served (one layer: each layer costs every call a coroutine)."""
    return [
        ObservingInterceptor(
            settings.max_message_bytes,
            tokens=settings.tokens(),
            record_metrics=bool(settings.metrics_port),
        )
    ]


def keepalive_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC keepalive channel arguments (grpc core doc/keepalive.md).

    gRPC's server defaults accept one client ping per 5 minutes and none without a call in
    flight: a client pinging every 10 s (grpc-js, Envoy, Go clients) earned ping strikes and
    GOAWAY too_many_pings, ending even an idle WatchLoss with "Bandwidth exhausted". Pings at
    --keepalive-min-ping-interval or slower are accepted, with or without calls; the server
    itself pings after --keepalive-time of quiet, also on idle streams (max_pings_without_data
    0), and closes a connection whose ping goes unanswered for --keepalive-timeout.
    """
    return [
        ("grpc.keepalive_time_ms", max(1, round(settings.keepalive_time * 1000))),
        ("grpc.keepalive_timeout_ms", max(1, round(settings.keepalive_timeout * 1000))),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        (
            "grpc.http2.min_ping_interval_without_data_ms",
            round(settings.keepalive_min_ping_interval * 1000),
        ),
    ]


def preflight(settings: Settings) -> TlsFiles | None:
    """Checks before anything binds: a writable data directory, TLS files that belong
    together (an expired certificate is served, with a warning); StartupError otherwise."""
    check_data_dir(settings.data_dir)
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    files = load_tls(settings.tls_cert, settings.tls_key)
    now = datetime.datetime.now(datetime.UTC)
    if files.not_after is not None and files.not_after < now:
        log.warning(
            "tls_certificate_expired",
            cert=str(settings.tls_cert),
            not_after=files.not_after.isoformat(),
            fix="clients that check expiry will refuse to connect; renew the certificate",
        )
    return files


def write_port_file(path: Path, port: int) -> None:
    """Write the bound port to ``path`` atomically (--port-file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{port}\n", encoding="ascii")
    os.replace(tmp, path)


class CannotServeError(Exception):
    """A start-up step failed and logged why; ``serve`` exits 2."""


async def start_registry(registry: Registry, settings: Settings) -> None:
    """Open the data directory and load its sessions; CannotServeError if it can't be used."""
    try:
        await registry.start()
    except CheckpointError as exc:
        log.error("cannot_start", error=str(exc))
        raise CannotServeError from None
    except OSError as exc:
        log.error(
            "cannot_start",
            error=f"data directory {settings.data_dir} can't be used "
            f"({exc.strerror or type(exc).__name__}); fix its permissions or choose another "
            "with --data-dir",
        )
        raise CannotServeError from None


def build_server(
    settings: Settings, registry: Registry, node: ClusterNode | None, service: SessionService
) -> tuple[aio.Server, Health]:
    """The gRPC server with RnnService, health and reflection, its interceptors (the cluster's
    router innermost: after auth and the request guard) and channel options."""
    options = [
        ("grpc.max_receive_message_length", HARD_MESSAGE_FACTOR * settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on a taken port must fail, not share it
        *keepalive_options(settings),
    ]
    interceptors = build_interceptors(settings)
    if node is not None:
        interceptors.append(node.router())
    server = aio.server(interceptors=interceptors, options=options)
    pb_grpc.add_RnnServiceServicer_to_server(Servicer(settings, registry, service), server)
    server_health = Health(registry)
    health_pb2_grpc.add_HealthServicer_to_server(server_health.servicer, server)
    reflection.enable_server_reflection(
        [
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    return server, server_health


def bind(server: aio.Server, settings: Settings, tls_files: TlsFiles | None) -> int:
    """Bind --address (with TLS when given); the port, CannotServeError if it can't be bound."""
    credentials = None
    if tls_files is not None:
        credentials = grpc.ssl_server_credentials([(tls_files.key, tls_files.cert)])
    return add_port(server, settings.address, credentials)


def bind_peer(server: aio.Server, settings: Settings, peer: PeerTls | None) -> int | None:
    """Bind --peer-address with mutual TLS (cluster mode); its port, None without peer TLS."""
    if peer is None:
        return None
    return add_port(server, settings.peer_address, peer.server_credentials())


def add_port(server: aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind ``address`` (TLS with ``credentials``); the port, CannotServeError if it can't be."""
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except (RuntimeError, OSError) as exc:
        log.error("cannot_bind", address=address, error=str(exc))
        raise CannotServeError from None
    if not port:
        log.error("cannot_bind", address=address, error="port unavailable")
        raise CannotServeError
    return port


def bind_health_port(settings: Settings, server_health: Health) -> aio.Server | None:
    """--health-port: a server of grpc.health.v1 alone in plain text (the main server's
    status), for probes that can't speak TLS, bound, not started; None when off.
    CannotServeError if it can't be bound."""
    if not settings.health_port:
        return None
    health_server = aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(server_health.servicer, health_server)
    host = metrics.metrics_host(settings.address)
    host = f"[{host}]" if ":" in host else host
    add_port(health_server, f"{host}:{settings.health_port}", None)
    return health_server


async def open_cluster(settings: Settings) -> ClusterNode | None:
    """Cluster mode's node (None without --redis-url), its peer TLS and Redis files checked
    and Redis asked once whether it accepts this replica; StartupError otherwise."""
    if not settings.redis_url:
        return None
    peer = load_peer_tls(settings)
    node = ClusterNode(settings, peer_tls=peer, redis_access=load_redis_access(settings))
    try:
        # Time for the client's retries of a refused connection (Redis down: start anyway).
        await check_redis(node.coordinator.redis, settings.redis_url, timeout=5.0)
    except StartupError:
        await node.close()
        raise
    return node


def start_metrics(settings: Settings, registry: Registry) -> metrics.MetricsServer | None:
    """Serve /metrics when --metrics-port is set (None when it isn't); CannotServeError if the
    port can't be bound."""
    if not settings.metrics_port:
        return None
    try:
        metrics_server = metrics.start(
            settings.address, settings.metrics_port, registry, settings.metrics_max_sessions
        )
    except OSError as exc:
        log.error("cannot_bind_metrics", port=settings.metrics_port, error=str(exc))
        raise CannotServeError from None
    log.info("metrics_serving", port=metrics_server.port, path="/metrics")
    return metrics_server


class Health:
    """grpc.health.v1 for the server ("") and RnnService: SERVING only while every source is
    fine: the data directory (checkpoints) and, in cluster mode, Redis. One source recovering
    must not hide the other's failure (a lease lapsing while Redis is down takes its unsaved
    session off the storage list). From shutdown on, shutdown owns it."""

    def __init__(self, registry: Registry) -> None:
        self.servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._registry = registry
        self._ok = {"storage": True, "redis": True}
        self._tasks: set[asyncio.Task[None]] = set()

    async def set(self, status: Any) -> None:
        """Set both names to ``status``."""
        for name in ("", SERVICE_NAME):
            await self.servicer.set(name, status)

    def report(self, source: str, ok: bool) -> None:
        """A source's state changed (called on the event loop)."""
        if self._registry.shutting_down:
            return  # shutdown owns health from here on
        self._ok[source] = ok
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if all(self._ok.values())
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        task = asyncio.create_task(self.set(status))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class StopSignals:
    """SIGTERM/SIGINT: the first asks for a clean stop, a second exits at once."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._received: list[str] = []

    def install(self) -> None:
        """Handle the signals from now on (on the running loop)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._received.append(sig.name)
        if self._stop.is_set():
            log.warning("second_signal", signal=sig.name, action="exiting now")
            os._exit(1)
        self._stop.set()

    async def wait(self) -> str:
        """Until the first signal; its name."""
        await self._stop.wait()
        return self._received[0] if self._received else ""


async def serve(settings: Settings) -> int:
    """Run the server until SIGTERM/SIGINT; return the process exit code."""
    try:
        tls_files = preflight(settings)
        # Cluster mode (issue 11): a fenced, shared store and a routing interceptor.
        node = await open_cluster(settings)
    except StartupError as exc:
        log.error("cannot_start", error=str(exc))
        return 2
    store = node.make_store() if node is not None else LocalStore(settings.data_dir)
    registry = Registry(settings, store)
    try:
        await start_registry(registry, settings)
    except CannotServeError:
        return 2
    service = SessionService(settings, registry)
    if node is not None:
        service.jobs.board = node.job_board(service.jobs)  # jobs move between replicas
    server, server_health = build_server(settings, registry, node, service)
    try:
        port = bind(server, settings, tls_files)
        peer_port = bind_peer(server, settings, node.peer_tls if node is not None else None)
        health_server = bind_health_port(settings, server_health)
        metrics_server = start_metrics(settings, registry)
    except CannotServeError:
        await registry.close()
        if node is not None:
            await node.close()
        return 2
    signals = StopSignals()
    signals.install()  # before the serving line: a SIGTERM sent as soon as it appears is clean
    await server.start()
    await server_health.set(health_pb2.HealthCheckResponse.SERVING)
    if health_server is not None:
        await health_server.start()
    registry.checkpoints.on_storage_change = lambda ok: server_health.report("storage", ok)
    if node is not None:
        node.attach(registry, peer_port or port)  # replicas forward to the peer port
        # NOT_SERVING while Redis is unreachable.
        node.start_health(lambda ok: server_health.report("redis", ok))
    resumed = await service.jobs.resume_all()  # the jobs a stop or a crash interrupted
    if resumed:
        log.info("jobs_resumed", count=resumed)
    log.info(
        "serving",
        port=port,
        address=settings.address,
        tls=tls_files is not None,
        peer_port=peer_port,
        auth=bool(settings.tokens()),
        data_dir=str(settings.data_dir),
        pid=os.getpid(),
    )
    if settings.port_file is not None:
        write_port_file(settings.port_file, port)

    log.info("shutting_down", signal=await signals.wait(), grace=settings.grace)
    await server_health.servicer.enter_graceful_shutdown()
    registry.begin_shutdown()
    await server.stop(settings.grace)
    if health_server is not None:
        await health_server.stop(None)
    await service.jobs.close()  # each job's loop checkpoints it: resumed at the next start
    saved = await registry.close()
    if node is not None:  # drain: every session was checkpointed above; give the leases back
        await node.drain()
        await node.close()
    if metrics_server is not None:
        metrics_server.close()
    log.info("stopped", saved=saved)
    return 0 if saved else 1
