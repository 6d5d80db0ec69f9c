"""Issue 9 item 13: clients that send keepalive pings keep their idle streams.

gRPC's server defaults accept one ping per 5 minutes (none without a call): a client pinging
every 10 s got GOAWAY too_many_pings after a few pings, and an idle WatchLoss ended with
RESOURCE_EXHAUSTED "Bandwidth exhausted". The intervals are settings, so the test runs the same
situation scaled down: the server accepts pings every 0.25 s, the client pings every 0.5 s
(grpc's default ping-strike window, 2 strikes, would close it after ~1.5 s), and the idle
WatchLoss must outlive many times that window and still deliver the next point.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tests.conftest import ServerFactory

PING_MS = 500  # the client's keepalive interval
HOLD_SECONDS = 8.0  # > 5x the strike window of gRPC's defaults at this ping rate

CLIENT_OPTIONS = [
    ("grpc.keepalive_time_ms", PING_MS),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def _follow(call: Any, out: queue.Queue[Any]) -> None:
    """Put every LossPoint of a WatchLoss call on ``out``, then its error or None at the end."""
    try:
        for response in call:
            for point in response.points:
                out.put(point)
        out.put(None)
    except grpc.RpcError as exc:
        out.put(exc)


@pytest.mark.timeout(90)
def test_idle_watch_survives_frequent_client_pings(server_factory: ServerFactory) -> None:
    server = server_factory(keepalive_min_ping_interval=0.25, keepalive_time=1.0)
    with server.client() as client:
        session = client.create_session("hello keepalive world", session_id="ka", seq_length=4)
        session.step()
    with grpc.insecure_channel(server.address, options=CLIENT_OPTIONS) as channel:
        stub = pb_grpc.RnnServiceStub(channel)
        call: Any = stub.WatchLoss(pb.WatchLossRequest(session_id="ka", from_step=1), timeout=60)
        points: queue.Queue[Any] = queue.Queue()
        follower = threading.Thread(target=_follow, args=(call, points), daemon=True)
        follower.start()
        first = points.get(timeout=30)
        assert isinstance(first, pb.LossPoint) and first.step == 1
        # Idle stream, pings only: wait for it to end (the failure) or the hold time to pass.
        deadline = time.monotonic() + HOLD_SECONDS
        ended: Any = "still open"
        with contextlib.suppress(queue.Empty):
            ended = points.get(timeout=HOLD_SECONDS)
        assert ended == "still open", (
            f"the idle WatchLoss ended after {HOLD_SECONDS - (deadline - time.monotonic()):.1f}"
            f" s of client pings: {ended!r}"
        )
        with server.client() as client:
            client.session("ka").step()
        second = points.get(timeout=30)
        assert isinstance(second, pb.LossPoint) and second.step == 2
        # The same connection also serves new calls after the idle period.
        assert stub.GetSession(pb.GetSessionRequest(session_id="ka"), timeout=30).session.step == 2
        call.cancel()
        follower.join(10)
    assert "too_many_pings" not in server.text_log()


@pytest.mark.timeout(90)
def test_idle_connection_without_calls_survives_frequent_client_pings(
    server_factory: ServerFactory,
) -> None:
    """Pings with no call in flight are accepted too: the connection stays READY (a GOAWAY
    too_many_pings would drop it to IDLE and make the client reconnect)."""
    server = server_factory(keepalive_min_ping_interval=0.25)
    states: queue.Queue[grpc.ChannelConnectivity] = queue.Queue()
    with grpc.insecure_channel(server.address, options=CLIENT_OPTIONS) as channel:
        stub = pb_grpc.RnnServiceStub(channel)
        stub.ListSessions(pb.ListSessionsRequest(), timeout=30)  # connected, then no calls
        channel.subscribe(states.put, try_to_connect=False)
        seen = [states.get(timeout=10)]  # the current state is reported first
        assert seen[0] is grpc.ChannelConnectivity.READY
        with contextlib.suppress(queue.Empty):
            seen.append(states.get(timeout=HOLD_SECONDS))  # any change is the failure
        assert seen == [grpc.ChannelConnectivity.READY], seen
        channel.unsubscribe(states.put)
        stub.ListSessions(pb.ListSessionsRequest(), timeout=30)


def _frames(sock: socket.socket) -> Iterator[tuple[int, int, bytes]]:
    """HTTP/2 frames read from ``sock``: (type, flags, payload)."""
    buffer = b""
    while True:
        while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
            length = int.from_bytes(buffer[:3], "big")
            yield buffer[3], buffer[4], buffer[9 : 9 + length]
            buffer = buffer[9 + length :]
        data = sock.recv(65536)
        if not data:
            return
        buffer += data


def _frame(kind: int, flags: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame on stream 0."""
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + bytes(4) + payload


@pytest.mark.timeout(60)
def test_server_pings_a_quiet_connection(server_factory: ServerFactory) -> None:
    """The server's own keepalive: a bare HTTP/2 connection that sends nothing gets a PING
    after --keepalive-time (gRPC's server default waits 2 hours)."""
    settings, ping, goaway, ack = 0x4, 0x6, 0x7, 0x1
    server = server_factory(keepalive_time=0.5, keepalive_timeout=20)
    with socket.create_connection((server.host, server.port), timeout=20) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(settings, 0))
        for kind, flags, payload in _frames(sock):
            if kind == settings and not flags & ack:
                sock.sendall(_frame(settings, ack))
            elif kind == ping and not flags & ack:
                sock.sendall(_frame(ping, ack, payload))
                break
            elif kind == goaway:
                raise AssertionError(f"GOAWAY before any PING: {payload!r}")
        else:
            raise AssertionError("the connection closed before the server sent a PING")


@pytest.mark.timeout(60)
def test_keepalive_defaults_accept_pings_every_ten_seconds() -> None:
    from rnnserve_server.app import keepalive_options
    from rnnserve_server.config import load_settings

    options = dict(keepalive_options(load_settings([], environ={})))
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.min_ping_interval_without_data_ms"] <= 10_000
    assert options["grpc.http2.max_pings_without_data"] == 0  # server pings idle streams too
    assert 0 < options["grpc.keepalive_time_ms"] <= 300_000
