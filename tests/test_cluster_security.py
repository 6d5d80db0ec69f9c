"""A cluster safe across machines (issue 19): replicas forward to each other over mutual TLS,
clients talk TLS, Redis runs with a password (requirepass) and TLS only, client certificates
required. Certificates are made by the test (tests/pki.py); every part is a real process."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from rnnserve import ServerUnavailable, Unauthenticated
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc
from rnnserve_server.testing import RedisProcess, RedisTls, free_port, start_redis

from tests.pki import Ca, Issued, make_ca
from tests.test_cluster import scrape
from tests.test_startup import assert_refused, run_server

if TYPE_CHECKING:
    from tests.conftest import ServerFactory, ServerHandle

pytestmark = pytest.mark.timeout(120)

TOKEN = "cluster-token"
PASSWORD = "redis pass-word with spaces"
TEXT = "the quick brown fox jumps over the lazy dog. " * 10
FORWARDED = "x-rnnserve-forwarded"
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class Pki:
    """Three CAs (clients' TLS, replicas' peer TLS, Redis's TLS), their certificates, and an
    impostor: a peer certificate from a CA the cluster does not know."""

    client_ca: Ca
    server: Issued  # what clients see (--tls-cert)
    peer_ca: Ca
    peer: Issued  # every replica's peer certificate
    impostor: Issued  # signed by another CA
    impostor_ca: Ca
    redis_ca: Ca
    redis: Issued  # Redis's own certificate
    redis_client: Issued  # what replicas present to Redis


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    client_ca, peer_ca = make_ca(root, "client-ca"), make_ca(root, "peer-ca")
    impostor_ca, redis_ca = make_ca(root, "impostor-ca"), make_ca(root, "redis-ca")
    return Pki(
        client_ca=client_ca,
        server=client_ca.issue(root, "server"),
        peer_ca=peer_ca,
        peer=peer_ca.issue(root, "replica"),
        impostor=impostor_ca.issue(root, "impostor"),
        impostor_ca=impostor_ca,
        redis_ca=redis_ca,
        redis=redis_ca.issue(root, "redis"),
        redis_client=redis_ca.issue(root, "redis-client"),
    )


@pytest.fixture(scope="module")
def secure_redis(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """A redis-server with requirepass, serving only TLS and requiring client certificates."""
    tls = RedisTls(
        pki.redis.cert,
        pki.redis.key,
        pki.redis_ca.cert,
        client_cert=pki.redis_client.cert,
        client_key=pki.redis_client.key,
    )
    redis = start_redis(tmp_path_factory.mktemp("redis"), password=PASSWORD, tls=tls)
    yield redis
    redis.kill()


def replica_settings(pki: Pki, redis: RedisProcess, shared: Path, **more: Any) -> dict[str, Any]:
    """A replica with TLS for clients, mutual TLS for replicas, the secure Redis."""
    return {
        **redis.server_settings(),
        "shared_dir": shared,
        "lease_ttl": 2,
        "auth_token": TOKEN,
        "tls_cert": pki.server.cert,
        "tls_key": pki.server.key,
        "peer_address": "127.0.0.1:0",
        "peer_tls_ca": pki.peer_ca.cert,
        "peer_tls_cert": pki.peer.cert,
        "peer_tls_key": pki.peer.key,
        **more,
    }


def peer_port(replica: ServerHandle) -> int:
    return int(replica.wait_for_log("serving", timeout=5)["peer_port"])


def get_session(address: str, credentials: grpc.ChannelCredentials | None, **call: Any) -> Any:
    """GetSession("owned") on a raw channel (plain text without credentials)."""
    if credentials is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, credentials)
    with channel:
        stub = pb_grpc.RnnServiceStub(channel)
        return stub.GetSession(pb.GetSessionRequest(session_id="owned"), timeout=5, **call)


def test_calls_are_forwarded_over_mutual_tls_and_only_peers_get_in(
    server_factory: ServerFactory, secure_redis: RedisProcess, pki: Pki, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    health_port = free_port()
    owner = server_factory(**replica_settings(pki, secure_redis, shared, health_port=health_port))
    metrics_port = free_port()
    other = server_factory(**replica_settings(pki, secure_redis, shared, metrics_port=metrics_port))
    tls = {"ca_file": pki.client_ca.cert, "token": TOKEN, "timeout": 20}
    with owner.client(**tls) as client:
        client.create_session(TEXT, session_id="owned", hidden_size=16, seq_length=8)
        assert client.session("owned").step().step == 1
    # Through the other replicas: forwarded to the owner over mutual TLS, the token with it.
    with other.client(**tls) as client:
        assert client.session("owned").step().step == 2
        assert scrape(metrics_port)["rnnserve_cluster_forwards_total"] == 1
        # ListSessions asks each owner for its entry over the peer port too.
        listed = {entry.session_id: entry for entry in client.list_sessions()}["owned"]
        assert listed.step == 2 and not listed.error
        assert listed.state != pb.SESSION_STATE_OWNER_UNREACHABLE
    with (
        other.client(ca_file=pki.client_ca.cert, token="wrong", timeout=10) as client,
        pytest.raises(Unauthenticated),
    ):
        client.session("owned").info()  # the owner checks the forwarded token too

    # The peer port: only a certificate the peer CA signed gets a TLS connection.
    address = f"127.0.0.1:{peer_port(owner)}"
    auth = [("authorization", f"Bearer {TOKEN}")]
    peer = _credentials(pki.peer_ca.cert, pki.peer)
    assert get_session(address, peer, metadata=[*auth, (FORWARDED, "1")]).session.step == 2
    for credentials in (
        None,  # plain text
        _credentials(pki.peer_ca.cert, None),  # TLS without a client certificate
        _credentials(pki.peer_ca.cert, pki.impostor),  # a certificate from another CA
    ):
        with pytest.raises(grpc.RpcError) as refused:
            get_session(address, credentials, metadata=auth)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # The clients' port: a client can't pass itself off as a replica.
    client_port = f"127.0.0.1:{owner.port}"
    server_tls = grpc.ssl_channel_credentials(pki.client_ca.cert.read_bytes())
    assert get_session(client_port, server_tls, metadata=auth).session.step == 2
    with pytest.raises(grpc.RpcError) as denied:
        get_session(client_port, server_tls, metadata=[*auth, (FORWARDED, "1")])
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "--peer-tls-ca" in (denied.value.details() or "")
    assert PASSWORD not in owner.text_log() and TOKEN not in owner.text_log()

    # --health-port: health alone in plain text, for Kubernetes' grpc probes (no TLS there).
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        assert check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
    with pytest.raises(grpc.RpcError) as unimplemented:
        get_session(f"127.0.0.1:{health_port}", None, metadata=auth)
    assert unimplemented.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_replica_without_the_peer_ca_can_not_forward(
    server_factory: ServerFactory, secure_redis: RedisProcess, pki: Pki, tmp_path: Path
) -> None:
    """An impostor (its own CA), and a replica forwarding in plain text: their forwards to an
    mTLS owner fail (OWNER_UNAVAILABLE), never fall back to something weaker."""
    shared = tmp_path / "shared"
    owner = server_factory(**replica_settings(pki, secure_redis, shared))
    impostor = server_factory(
        **replica_settings(
            pki,
            secure_redis,
            shared,
            peer_tls_ca=pki.impostor_ca.cert,
            peer_tls_cert=pki.impostor.cert,
            peer_tls_key=pki.impostor.key,
        )
    )
    plain = server_factory(
        **{
            **secure_redis.server_settings(),
            "shared_dir": shared,
            "lease_ttl": 2,
            "auth_token": TOKEN,
        }
    )
    with owner.client(ca_file=pki.client_ca.cert, token=TOKEN) as client:
        client.create_session(TEXT, session_id="kept", hidden_size=16, seq_length=8)
    for replica, tls in ((impostor, {"ca_file": pki.client_ca.cert}), (plain, {})):
        with (
            replica.client(token=TOKEN, timeout=3, **tls) as client,
            pytest.raises(ServerUnavailable, match="did not answer"),
        ):
            client.session("kept").info()
    with owner.client(ca_file=pki.client_ca.cert, token=TOKEN) as client:
        assert client.session("kept").info().step == 0  # the owner kept it


@pytest.mark.timeout(90)
def test_redis_password_and_tls_mistakes_stop_the_server(
    secure_redis: RedisProcess, pki: Pki, tmp_path: Path
) -> None:
    settings = secure_redis.server_settings()
    base = [
        "--redis-url", secure_redis.url,
        "--shared-dir", str(tmp_path / "shared"),
        "--redis-tls-ca", str(pki.redis_ca.cert),
        "--redis-tls-cert", str(pki.redis_client.cert),
        "--redis-tls-key", str(pki.redis_client.key),
    ]  # fmt: skip
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not the password\n")
    result = run_server(tmp_path, *base, "--redis-password-file", str(wrong))
    line = assert_refused(result, "cannot_start", "refused this replica", "--redis-password-file")
    assert "not the password" not in result.stderr
    result = run_server(tmp_path, *base)  # no password at all
    assert_refused(result, "cannot_start", "refused this replica")
    assert "127.0.0.1" in line
    password = ["--redis-password-file", str(settings["redis_password_file"])]
    other_ca = ["--redis-tls-ca", str(pki.peer_ca.cert)]
    result = run_server(tmp_path, *base, *password, *other_ca)
    assert_refused(result, "cannot_start", "TLS with Redis at", "--redis-tls-ca must hold")


def _credentials(ca: Path, cert: Issued | None) -> grpc.ChannelCredentials:
    if cert is None:
        return grpc.ssl_channel_credentials(ca.read_bytes())
    return grpc.ssl_channel_credentials(
        ca.read_bytes(), cert.key.read_bytes(), cert.cert.read_bytes()
    )
