"""Prometheus metrics, served over HTTP at ``/metrics`` when ``--metrics-port`` is set.

Everything lives in one dedicated ``CollectorRegistry`` (:data:`REGISTRY`), never the
prometheus-client default, so nothing a library registers globally leaks in:

- the RPC metrics under the names and labels of go-grpc-prometheus (what stock gRPC dashboards
  query), labels ``grpc_type`` (unary, client_stream, server_stream, bidi_stream),
  ``grpc_service``, ``grpc_method``: ``grpc_server_started_total``,
  ``grpc_server_handled_total{...,grpc_code}`` (finished RPCs by status code name),
  ``grpc_server_handling_seconds`` (histogram; for a stream, from the call to its last message)
  and ``grpc_server_msg_sent_total`` / ``grpc_server_msg_received_total`` (messages);
- ``rnnserve_active_streams{grpc_service,grpc_method}``: streaming RPCs in flight;
- ``rnnserve_build_info{version,python,grpcio,numpy}``: always 1, the versions running;
- ``rnnserve_sessions``, ``rnnserve_sessions_resident``, ``rnnserve_sessions_on_disk``: sessions
  known, with their model in memory, with a checkpoint file in the data directory;
- ``rnnserve_training_updates_total``, ``rnnserve_training_chars_total``: optimizer updates
  applied and characters trained on (``rate(...[1m])`` is updates/s and chars/s);
- ``rnnserve_checkpoints_total{result}`` (ok / error) and ``rnnserve_checkpoint_duration_seconds``;
- ``rnnserve_sessions_unsaved``: sessions whose last checkpoint failed (alert on > 0);
- ``rnnserve_training_divergences_total``: Trains that ended as diverged and Steps refused
  because their update diverged;
- per session, label ``session_id``, for the ``--metrics-max-sessions`` most recently active
  sessions a server holds: ``rnnserve_session_step``, ``rnnserve_session_smoothed_loss``,
  ``rnnserve_session_validation_loss`` (once measured), ``rnnserve_session_chars_per_second``
  (over the last THROUGHPUT_WINDOW complete seconds); ``rnnserve_session_series_omitted``:
  sessions left out by the cap;
- ``process_*`` and ``python_info``: the standard process and platform collectors.

The RPC metrics (and ``ACTIVE_STREAMS``) are recorded by interceptors.ObservingInterceptor,
only when metrics are on; training and checkpoint counters are bumped by the use cases and the
checkpoint writer whether or not they are served (an increment costs well under a microsecond).
"""

from __future__ import annotations

import heapq
import importlib.metadata
import platform
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import prometheus_client
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

from rnnserve_server import __version__

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

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

RPC_LABELS = ["grpc_type", "grpc_service", "grpc_method"]
STARTED = Counter(
    "grpc_server_started",
    "RPCs started on the server.",
    RPC_LABELS,
    registry=REGISTRY,
)
HANDLED = Counter(
    "grpc_server_handled",
    "RPCs completed on the server, by gRPC status code.",
    [*RPC_LABELS, "grpc_code"],
    registry=REGISTRY,
)
HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "RPC handling time in seconds; for streams, until the last message.",
    RPC_LABELS,
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)
MSG_SENT = Counter(
    "grpc_server_msg_sent",
    "Response messages sent by the server.",
    RPC_LABELS,
    registry=REGISTRY,
)
MSG_RECEIVED = Counter(
    "grpc_server_msg_received",
    "Request messages received by the server.",
    RPC_LABELS,
    registry=REGISTRY,
)
ACTIVE_STREAMS = Gauge(
    "rnnserve_active_streams",
    "Streaming RPCs in flight.",
    ["grpc_service", "grpc_method"],
    registry=REGISTRY,
)
BUILD_INFO = Gauge(
    "rnnserve_build_info",
    "Always 1; the labels say which versions are running.",
    ["version", "python", "grpcio", "numpy"],
    registry=REGISTRY,
)


def _build_info() -> None:
    # Versions from the package metadata: importing grpc here would pull the transport into
    # the use-case layer, which records metrics but knows nothing of gRPC.
    BUILD_INFO.labels(
        version=__version__,
        python=platform.python_version(),
        grpcio=importlib.metadata.version("grpcio"),
        numpy=importlib.metadata.version("numpy"),
    ).set(1)


_build_info()
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
DIVERGENCES = Counter(
    "rnnserve_training_divergences",
    "Trains that ended as diverged and Steps refused because their update diverged.",
    registry=REGISTRY,
)


JOBS = Gauge(
    "rnnserve_jobs",
    "Training jobs on this server by state (queued: waiting for a --max-running-jobs slot).",
    ["state"],
    registry=REGISTRY,
)
for _state in ("queued", "running"):
    JOBS.labels(state=_state)
JOB_QUEUE_WAIT = Histogram(
    "rnnserve_job_queue_wait_seconds",
    "How long a training job waited for a slot before a chunk of training.",
    buckets=DURATION_BUCKETS,
    registry=REGISTRY,
)


def record_jobs(queued: int, running: int) -> None:
    """The number of queued and running training jobs now."""
    JOBS.labels(state="queued").set(queued)
    JOBS.labels(state="running").set(running)


def record_training(updates: int, chars: int, session_id: str | None = None) -> None:
    """Count ``updates`` optimizer updates over ``chars`` characters (of ``session_id``'s
    chars/s gauge when given)."""
    if updates > 0:
        TRAINING_UPDATES.inc(updates)
    if chars > 0:
        TRAINING_CHARS.inc(chars)
        if session_id is not None:
            THROUGHPUT.add(session_id, chars)


def record_divergence() -> None:
    """Count a Train that ended as diverged or a Step whose update diverged."""
    DIVERGENCES.inc()


def record_checkpoint(seconds: float, ok: bool = True) -> None:
    """Count one checkpoint write; a successful one also goes into the duration histogram."""
    CHECKPOINTS.labels(result="ok" if ok else "error").inc()
    if ok:
        CHECKPOINT_DURATION.observe(seconds)


# ----- RPCs ------------------------------------------------------------------------------------


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service, method


def grpc_type(request_streaming: bool, response_streaming: bool) -> str:
    """The ``grpc_type`` label of a method of that shape."""
    if request_streaming:
        return "bidi_stream" if response_streaming else "client_stream"
    return "server_stream" if response_streaming else "unary"


class RpcMetrics:
    """The RPC series of one method, with their label lookups done once (per status code for
    ``handled``), so recording a call costs a few increments."""

    def __init__(self, kind: str, service: str, method: str) -> None:
        labels = {"grpc_type": kind, "grpc_service": service, "grpc_method": method}
        self._labels = labels
        self.started = STARTED.labels(**labels)
        self.seconds = HANDLING_SECONDS.labels(**labels)
        self.sent = MSG_SENT.labels(**labels)
        self.received = MSG_RECEIVED.labels(**labels)
        self._handled: dict[str, Any] = {}

    def finished(self, code: str, seconds: float, messages_sent: int) -> None:
        """Count one finished call under its status code name, time it and count its
        response messages."""
        handled = self._handled.get(code)
        if handled is None:
            handled = self._handled[code] = HANDLED.labels(**self._labels, grpc_code=code)
        handled.inc()
        self.seconds.observe(seconds)
        if messages_sent:
            self.sent.inc(messages_sent)


# ----- sessions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionGauges:
    """One server's session counts at a scrape."""

    known: int  # sessions known to the server
    resident: int  # with their model in memory
    on_disk: int  # with a checkpoint file in the data directory
    unsaved: int  # whose last checkpoint failed


# What a running server is asked for its gauges (Registry.gauges): called in the HTTP server's
# thread, so it only reads, copying containers before iterating.
GaugeSource = Callable[[], SessionGauges]


class SessionCollector(Collector):
    """Session gauges computed at scrape time from the running servers' gauge sources."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: list[GaugeSource] = []

    def add(self, source: GaugeSource) -> None:
        """Include ``source``'s sessions in the gauges."""
        with self._lock:
            self._sources.append(source)

    def remove(self, source: GaugeSource) -> None:
        """Stop counting ``source`` (its server stopped)."""
        with self._lock:
            if source in self._sources:
                self._sources.remove(source)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """Runs in the HTTP server's thread."""
        with self._lock:
            sources = list(self._sources)
        gauges = [source() for source in sources]
        known = sum(g.known for g in gauges)
        resident = sum(g.resident for g in gauges)
        on_disk = sum(g.on_disk for g in gauges)
        unsaved = sum(g.unsaved for g in gauges)
        yield GaugeMetricFamily("rnnserve_sessions", "Sessions known to the server.", value=known)
        yield GaugeMetricFamily(
            "rnnserve_sessions_resident", "Sessions with their model in memory.", value=resident
        )
        yield GaugeMetricFamily(
            "rnnserve_sessions_on_disk",
            "Sessions with a checkpoint file in the data directory.",
            value=on_disk,
        )
        yield GaugeMetricFamily(
            "rnnserve_sessions_unsaved",
            "Sessions whose last checkpoint failed: their changes are in memory only.",
            value=unsaved,
        )


SESSIONS = SessionCollector()
REGISTRY.register(SESSIONS)


# ----- per-session series ----------------------------------------------------------------------

# The chars/s gauge is the mean over this many complete seconds: long enough to smooth the
# chunks of a Train, short enough to fall to 0 soon after training stops.
THROUGHPUT_WINDOW = 10


class Throughput:
    """Characters trained per session in one-second buckets, for the chars/s gauge: a Step
    loop costs a lookup and an addition per Step, and memory stays a few buckets a session."""

    def __init__(self, window: int = THROUGHPUT_WINDOW) -> None:
        self.window = window
        self._lock = threading.Lock()  # add() on the event loop, rate() in the HTTP thread
        self._buckets: dict[str, deque[list[int]]] = {}  # id -> [[second, chars], ...]
        self._swept = 0

    def add(self, session_id: str, chars: int, now: float | None = None) -> None:
        """Count ``chars`` trained for ``session_id`` at ``now`` (default: the monotonic clock)."""
        second = int(time.monotonic() if now is None else now)
        with self._lock:
            buckets = self._buckets.get(session_id)
            if buckets is None:
                buckets = self._buckets[session_id] = deque(maxlen=self.window + 1)
            if buckets and buckets[-1][0] == second:
                buckets[-1][1] += chars
            else:
                buckets.append([second, chars])
            if second - self._swept > self.window:  # forget sessions idle for a window
                self._swept = second
                oldest = second - self.window
                for idle in [i for i, b in self._buckets.items() if b[-1][0] < oldest]:
                    del self._buckets[idle]

    def rate(self, session_id: str, now: float | None = None) -> float:
        """Mean characters per second over the last ``window`` complete seconds."""
        second = int(time.monotonic() if now is None else now)
        with self._lock:
            buckets = list(self._buckets.get(session_id, ()))
        return sum(c for s, c in buckets if second - self.window <= s < second) / self.window


THROUGHPUT = Throughput()


@dataclass(frozen=True)
class SessionPoint:
    """One session's per-session gauges at a scrape (from Registry.session_points)."""

    session_id: str
    active: float  # when it was last used (monotonic seconds); inf while a call runs on it
    step: int
    smoothed_loss: float | None  # None before its first update
    validation_loss: float | None  # None until one was measured


# What a running server is asked for its sessions' points: called in the HTTP server's thread.
PointSource = Callable[[], Iterable[SessionPoint]]


class SessionSource(Protocol):
    """A running server's sessions as /metrics reads them (its Registry); both methods run in
    the HTTP server's thread, so they only read, copying containers before iterating."""

    def gauges(self) -> SessionGauges: ...

    def session_points(self) -> Iterable[SessionPoint]: ...


class SessionSeries(Collector):
    """The per-session gauges of each running server's ``cap`` most recently active sessions.

    Computed at scrape time from the sessions the server holds, so a session that leaves the
    cap, is deleted or moves to another replica loses its series at the next scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: list[tuple[PointSource, int]] = []

    def add(self, source: PointSource, cap: int) -> None:
        """Report the ``cap`` most recently active of ``source``'s sessions."""
        with self._lock:
            self._sources.append((source, cap))

    def remove(self, source: PointSource) -> None:
        """Stop reporting ``source``'s sessions (its server stopped)."""
        with self._lock:
            self._sources = [(s, cap) for s, cap in self._sources if s != source]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        """Runs in the HTTP server's thread."""
        labels = ["session_id"]
        step = GaugeMetricFamily(
            "rnnserve_session_step", "Updates applied to the session.", labels=labels
        )
        loss = GaugeMetricFamily(
            "rnnserve_session_smoothed_loss",
            "The session's training loss (nats/char), exponentially smoothed.",
            labels=labels,
        )
        validation = GaugeMetricFamily(
            "rnnserve_session_validation_loss",
            "The session's latest validation loss (nats/char).",
            labels=labels,
        )
        speed = GaugeMetricFamily(
            "rnnserve_session_chars_per_second",
            f"Characters the session trained on per second, over the last {THROUGHPUT_WINDOW} s.",
            labels=labels,
        )
        omitted = 0
        with self._lock:
            sources = list(self._sources)
        now = time.monotonic()
        for source, cap in sources:
            points = list(source())
            shown = heapq.nlargest(cap, points, key=lambda p: p.active)
            omitted += len(points) - len(shown)
            for point in shown:
                ident = [point.session_id]
                step.add_metric(ident, point.step)
                if point.smoothed_loss is not None:
                    loss.add_metric(ident, point.smoothed_loss)
                if point.validation_loss is not None:
                    validation.add_metric(ident, point.validation_loss)
                speed.add_metric(ident, THROUGHPUT.rate(point.session_id, now))
        yield from (step, loss, validation, speed)
        yield GaugeMetricFamily(
            "rnnserve_session_series_omitted",
            "Sessions without per-session series: beyond --metrics-max-sessions.",
            value=omitted,
        )


SESSION_SERIES = SessionSeries()
REGISTRY.register(SESSION_SERIES)


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

    def __init__(self, sessions: SessionSource, host: str, port: int, max_sessions: int) -> None:
        self._gauges = sessions.gauges
        self._points = sessions.session_points
        self._http: WSGIServer
        self._http, self._thread = prometheus_client.start_http_server(
            port, addr=host, registry=REGISTRY
        )
        self.port: int = self._http.server_port
        SESSIONS.add(self._gauges)
        SESSION_SERIES.add(self._points, max_sessions)

    def close(self) -> None:
        """Stop serving and stop counting this server's sessions."""
        SESSIONS.remove(self._gauges)
        SESSION_SERIES.remove(self._points)
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(5)


def start(address: str, port: int, sessions: SessionSource, max_sessions: int) -> MetricsServer:
    """Serve ``/metrics`` on ``port`` at the host of the gRPC ``address``: the session gauges
    of ``sessions`` (a server's registry) and per-session series for its ``max_sessions``
    most recently active sessions.

    Raises OSError when the port cannot be bound.
    """
    return MetricsServer(sessions, metrics_host(address), port, max_sessions)
