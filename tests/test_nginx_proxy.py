"""A real nginx (``grpc_pass``, ``hash $http_x_session_id consistent``) in front of real
rnnserve servers: the load balancer of cluster mode carries gRPC, streams included."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:
    from tests.cluster_fixtures import NginxFactory
    from tests.conftest import ServerFactory

pytestmark = pytest.mark.timeout(90)


def health_via(address: str, session_id: str | None = None) -> int:
    """A plain grpc.health.v1 Check through ``address``; the status number."""
    metadata = [("x-session-id", session_id)] if session_id is not None else None
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(
            health_pb2.HealthCheckRequest(service=""),
            timeout=20,
            metadata=metadata,
            wait_for_ready=True,
        )
        return int(reply.status)


def test_health_check_through_nginx(
    server_factory: ServerFactory, nginx_factory: NginxFactory
) -> None:
    server = server_factory()
    nginx = nginx_factory([server.address])
    assert health_via(nginx.address) == health_pb2.HealthCheckResponse.SERVING
    with server.client(address=nginx.address) as client:
        assert client.health() == "SERVING"


def test_session_flow_and_streams_through_nginx(
    server_factory: ServerFactory, nginx_factory: NginxFactory
) -> None:
    server = server_factory()
    nginx = nginx_factory([server.address])
    text = "hello world, hello nginx. " * 40
    with server.client(address=nginx.address) as client:
        session = client.create_session(text, session_id="via-nginx", hidden_size=16, seed=1)
        final = session.train(30, report_every=10).wait()  # server stream
        assert final.step == 30
        watch = session.watch_loss(from_step=1)  # live stream: history first
        steps = []
        for point in watch:
            steps.append(point.step)
            if point.step >= 30:
                break
        watch.cancel()
        assert steps == list(range(1, 31))
        assert len(session.generate(50, prime="hel", seed=3)) == 50
        session.append_text("hello, world. " * 100)  # client stream
        assert session.info().step == 30
    # The same session is there when asked directly: nginx only carried the calls.
    with server.client() as direct:
        assert [s.session_id for s in direct.list_sessions()] == ["via-nginx"]


def test_same_session_id_goes_to_the_same_upstream(
    server_factory: ServerFactory, nginx_factory: NginxFactory
) -> None:
    servers = [server_factory(), server_factory()]
    nginx = nginx_factory([s.address for s in servers])
    for session_id in [f"s{i}" for i in range(20)]:
        for _ in range(3):
            assert health_via(nginx.address, session_id) == 1
    upstream_by_id: dict[str, set[str]] = {}
    for line in (nginx.directory / "access.log").read_text().splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        upstream_by_id.setdefault(fields["sid"], set()).add(fields["upstream"])
    assert len(upstream_by_id) == 20
    assert all(len(upstreams) == 1 for upstreams in upstream_by_id.values())
    # Consistent hashing spreads 20 ids over both replicas.
    used = set().union(*upstream_by_id.values())
    assert used == {s.address for s in servers}
