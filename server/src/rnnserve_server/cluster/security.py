"""How a replica reaches the others and Redis safely: mutual TLS between replicas and Redis
with AUTH and TLS. The files are read and checked at start (``rnnserve_server.startup``);
these objects only carry them to the channels and the Redis client.

Replicas forward calls to each other on a port of their own (``--peer-address``) that demands
a client certificate signed by the peer CA: gRPC's server credentials either require and
verify client certificates on a port or never ask for one, so the clients' port can't also
tell replicas apart (docs/architecture.md, "What we chose, and why").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio


@dataclass(frozen=True)
class PeerTls:
    """This replica's peer certificate and key and the CA that signs every replica's."""

    ca: bytes
    cert: bytes
    key: bytes
    server_name: str = ""  # checked in a peer's certificate instead of the address's host

    def server_credentials(self) -> grpc.ServerCredentials:
        """The peer port's: our certificate, and a client certificate from the CA required."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """A forward's: the peer's certificate checked against the CA, ours presented."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel arguments: the name to check in the peer's certificate, if not its host."""
        if not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def from_peer(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """True if the call came with a client certificate gRPC verified: only the peer port asks
    for one (and accepts only the peer CA's)."""
    auth: Any = context.auth_context() or {}
    return bool(auth.get("x509_pem_cert"))


@dataclass(frozen=True)
class RedisAccess:
    """The Redis password (never logged) and, for rediss:// URLs, the TLS files."""

    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def __repr__(self) -> str:  # the password must not end up in a log line or traceback
        return f"RedisAccess(password={'***' if self.password else None}, ca_file={self.ca_file!r})"

    def client_options(self, url: str) -> dict[str, Any]:
        """Keyword arguments for ``redis.asyncio.Redis.from_url(url, ...)``."""
        options: dict[str, Any] = {}
        if self.password is not None:
            options["password"] = self.password
        if url.startswith("rediss://"):
            options.update(
                ssl_cert_reqs="required",
                ssl_check_hostname=True,
                ssl_ca_certs=self.ca_file,
                ssl_certfile=self.cert_file,
                ssl_keyfile=self.key_file,
            )
        return options
