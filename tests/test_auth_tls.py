"""Bearer-token auth and TLS on a real server."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from rnnserve import ServerUnavailable, Unauthenticated

from tests.pki import self_signed

if TYPE_CHECKING:
    from tests.conftest import ServerFactory

TOKEN = "s3cret-token-value"


@pytest.mark.timeout(60)
def test_token_required_except_for_health(server_factory: ServerFactory) -> None:
    server = server_factory(auth_token=[TOKEN, "second-token"])
    with server.client(token=None) as anonymous:
        assert anonymous.health() == "SERVING"  # health needs no token
        with pytest.raises(Unauthenticated, match="Bearer"):
            anonymous.create_session("hello world")
        with pytest.raises(Unauthenticated):
            list(anonymous.list_sessions())
        with pytest.raises(Unauthenticated):
            anonymous.session("x").watch_loss(1).__next__()
    with server.client(token="wrong") as wrong, pytest.raises(Unauthenticated):
        wrong.session("x").info()
    with server.client(token=TOKEN) as good:
        s = good.create_session("hello world", session_id="authed", seq_length=4)
        assert s.step().step == 1
    with server.client(token="second-token") as other:
        assert other.session("authed").info().step == 1
    assert server.stop() == 0
    log = server.text_log()
    assert TOKEN not in log and "wrong" not in log
    assert any(e.get("code") == "UNAUTHENTICATED" for e in server.logs)


@pytest.mark.timeout(60)
def test_token_file_and_env(server_factory: ServerFactory, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\nfile-token\n\n")
    server = server_factory(auth_token_file=tokens, env={"RNNSERVE_AUTH_TOKEN": "env-token"})
    for token in ("file-token", "env-token"):
        with server.client(token=token) as c:
            assert list(c.list_sessions()) == []
    with server.client(token="comment") as c, pytest.raises(Unauthenticated):
        list(c.list_sessions())


def make_self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost / 127.0.0.1 and its key, as PEM files."""
    issued = self_signed(directory, "cert")
    return issued.cert, issued.key


@pytest.mark.timeout(60)
def test_tls_with_self_signed_certificate(server_factory: ServerFactory, tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path)
    server = server_factory(tls_cert=cert, tls_key=key, auth_token=TOKEN)
    address = f"localhost:{server.port}"
    with server.client(address=address, ca_file=cert, token=TOKEN) as client:
        assert client.health() == "SERVING"
        s = client.create_session("hello tls world", session_id="tls", seq_length=4)
        assert s.step().step == 1
    with (
        server.client(address=address, timeout=3, token=TOKEN) as plain,
        pytest.raises(ServerUnavailable),
    ):
        plain.session("tls").info()
    # A raw channel trusting the certificate also works (what grpcurl -cacert does).
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(address, credentials) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
