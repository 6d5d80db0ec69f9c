"""Fixtures for cluster mode over :mod:`rnnserve_server.testing`: a real ``redis-server`` and
a real ``nginx`` (Debian packages, installed by ``make deps``) on free loopback ports, each in
a temporary directory.

``redis_server`` is a started :class:`RedisProcess` (``appendonly yes``): ``.url`` for clients,
``.restart()`` stops it (SIGTERM: it writes its data) and starts it again on the same port and
data, ``.kill()`` for a crash. ``nginx_factory(upstreams)`` starts an :class:`NginxProcess`
that proxies gRPC (``grpc_pass``) to the given ``host:port`` upstreams, choosing one by
``hash $http_x_session_id consistent``. Both wait on a condition with a deadline (PING answered,
port accepting), never a sleep, and are stopped at the end of the test.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rnnserve_server.testing import NginxProcess, RedisProcess, start_nginx, start_redis

__all__ = ["NginxFactory", "NginxProcess", "RedisProcess"]

NginxFactory = Callable[[list[str]], NginxProcess]


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A started redis-server for one test; stopped at the end."""
    server = start_redis(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
def nginx_factory(tmp_path: Path) -> Iterator[NginxFactory]:
    """Start nginx instances in front of given upstreams; all stopped at the end."""
    started: list[NginxProcess] = []
    counter = iter(range(1_000_000))

    def factory(upstreams: list[str]) -> NginxProcess:
        handle = start_nginx(tmp_path / f"nginx{next(counter)}", upstreams)
        started.append(handle)
        return handle

    yield factory
    for handle in started:
        if handle.alive:
            handle.stop()
        handle.kill()
