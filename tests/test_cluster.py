"""Cluster mode end to end: a real redis-server, three real rnnserve-server replicas on
loopback ports sharing one checkpoint directory, and (for one test) nginx in front.

Every replica accepts every call: a session owned elsewhere is forwarded to its owner, one
owned by no one is activated from its latest shared checkpoint."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.cluster_fixtures import RedisProcess
    from tests.conftest import ServerFactory, ServerHandle

pytestmark = pytest.mark.timeout(180)

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


def start_replicas(
    server_factory: ServerFactory,
    redis: RedisProcess,
    shared: Path,
    count: int = 3,
    **settings: Any,
) -> list[ServerHandle]:
    """``count`` replicas on one Redis and one shared directory."""
    settings.setdefault("lease_ttl", 2)
    return [
        server_factory(redis_url=redis.url, shared_dir=shared, **settings) for _ in range(count)
    ]


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll ``condition`` until true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        event.wait(0.05)


def test_any_replica_serves_any_session(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    replicas = start_replicas(server_factory, redis_server, tmp_path / "shared")
    clients = [r.client() for r in replicas]
    try:
        created = clients[0].create_session(TEXT, session_id="one", hidden_size=16, seed=1)
        assert created.info().step == 0
        for i, client in enumerate(clients * 2):
            reply = client.session("one").step()
            assert reply.step == i + 1
        final = clients[2].session("one").train(10, report_every=5).wait()
        assert final.step == 16
        assert [s.session_id for s in clients[1].list_sessions()] == ["one"]
        assert len(clients[1].session("one").generate(20, prime="the", seed=2)) == 20
        clients[2].session("one").append_text("more text here. " * 10)
        assert clients[0].session("one").info().step == 16
        clients[1].session("one").delete()
        assert list(clients[2].list_sessions()) == []
    finally:
        for client in clients:
            client.close()


def test_sigterm_drains_without_losing_steps(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    replicas = start_replicas(server_factory, redis_server, tmp_path / "shared")
    with replicas[0].client() as first:
        for i in range(3):
            session = first.create_session(TEXT, session_id=f"d{i}", hidden_size=16, seed=i)
            assert session.step().step == 1  # owned by replica 0 now
    assert replicas[0].stop(signal.SIGTERM) == 0
    with replicas[1].client() as other:
        for i in range(3):
            assert other.session(f"d{i}").step().step == 2  # 0 steps lost
