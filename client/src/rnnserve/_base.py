"""The base of both clients (as httpx's ``BaseClient``): the constructor's settings and what
every call sends with them, without I/O. The sync plumbing (:mod:`rnnserve._rpc`) and the
asyncio one (:mod:`rnnserve._aio_rpc`) build on it; the public clients and their sessions on
those, so nothing imports back up."""

from __future__ import annotations

import os
from collections.abc import Iterable
from functools import cached_property
from typing import Any, Generic, TypeVar

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2_grpc

from rnnserve._common import (
    ADDRESS_ENV,
    DEFAULT_ADDRESS,
    auth_metadata,
    channel_credentials,
    channel_options,
    session_metadata,
)

ChannelT = TypeVar("ChannelT", grpc.Channel, aio.Channel)


class BaseClient(Generic[ChannelT]):
    """Settings of a connection to an rnnserve server; the arguments are described on
    :class:`rnnserve.Client`. Subclasses make the channel (sync or asyncio)."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = 30.0,
        token: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        tls: bool = False,
        tls_server_name: str | None = None,
        options: Iterable[tuple[str, Any]] = (),
    ) -> None:
        if address is None:
            # Like the CLI's --address: the environment, then localhost.
            address = os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
        self.address = address
        self.timeout = timeout
        self._metadata = auth_metadata(token)
        self._options = list(options)
        self._tls_server_name = tls_server_name
        self._credentials = channel_credentials(ca_file, tls)
        self._channel: ChannelT = self._make_channel(generate=False)
        self._seeded_channel: ChannelT | None = None

    def _make_channel(self, *, generate: bool) -> ChannelT:
        """A channel to ``address`` with this client's options and credentials."""
        raise NotImplementedError

    @cached_property
    def _health(self) -> health_pb2_grpc.HealthStub:
        """grpc.health.v1 on the channel (its stub takes a sync or an asyncio channel)."""
        return health_pb2_grpc.HealthStub(self._channel)

    def _channel_options(self, *, generate: bool) -> list[tuple[str, Any]]:
        return channel_options(self._options, self._tls_server_name, generate=generate)

    def _generate_channel(self, seeded: bool) -> ChannelT:
        """The channel for a Generate call. Seeded calls may be retried (the same seed makes
        the same text), unseeded ones not; a retry policy is per method, so seeded calls get a
        channel of their own, made on first use."""
        if not seeded:
            return self._channel
        if self._seeded_channel is None:
            self._seeded_channel = self._make_channel(generate=True)
        return self._seeded_channel

    def _deadline(self, timeout: float | None) -> float | None:
        """A unary call's deadline: its own ``timeout``, else the client's."""
        return self.timeout if timeout is None else timeout

    def _call_metadata(self, session_id: str) -> tuple[tuple[str, str], ...]:
        """The token, and the session id for a hashing load balancer."""
        return session_metadata(self._metadata, session_id)


def session_of(request: Any) -> str:
    """The session a request is about, for the load balancer's hint: its ``session_id``, or
    the session in a job's ``name`` (sessions/{session}/jobs/{job}); "" if neither."""
    session_id = str(getattr(request, "session_id", "") or "")
    if session_id:
        return session_id
    parts = str(getattr(request, "name", "") or "").split("/")
    return parts[1] if len(parts) == 4 and parts[0] == "sessions" and parts[2] == "jobs" else ""
