"""Fixtures for cluster mode over :mod:`rnnserve_server.testing`: a real ``redis-server`` and
a real ``nginx`` (Debian packages, installed by ``make deps``) on free loopback ports, each in
a temporary directory.

``redis_server`` is a started :class:`RedisProcess` (``appendonly yes``): ``.url`` for clients,
``.restart()`` stops it (SIGTERM: it writes its data) and starts it again on the same port and
data, ``.kill()`` for a crash. ``redis_factory(*options)`` starts others with more
redis-server options (``"--appendonly", "no"``: a restart loses everything).
``nginx_factory(upstreams)`` starts an :class:`NginxProcess` that proxies gRPC (``grpc_pass``)
to the given ``host:port`` upstreams, choosing one by ``hash $http_x_session_id consistent``.
Both wait on a condition with a deadline (PING answered,
port accepting), never a sleep, and are stopped at the end of the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rnnserve_server.testing import (
    NginxProcess,
    RedisProcess,
    daemons,
    start_nginx,
    start_redis,
)

__all__ = ["NginxFactory", "NginxProcess", "RedisFactory", "RedisProcess"]

NginxFactory = Callable[[list[str]], NginxProcess]
RedisFactory = Callable[..., RedisProcess]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A started redis-server for one test; stopped at the end."""
    server = start_redis(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[RedisFactory]:
    """Start redis-servers with more options (``redis_factory("--appendonly", "no")``); all
    stopped at the end of the test."""
    with daemons(tmp_path, "redis", start_redis) as factory:
        yield factory


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[NginxFactory]:
    """Start nginx instances in front of given upstreams; all stopped at the end."""
    with daemons(tmp_path, "nginx", start_nginx) as factory:
        yield factory
