"""Answers that must stay right when calls race or a part of the cluster fails: concurrent
deletes of one id, concurrent creations of one new id on two replicas, ListSessions with an
owner gone, Steps on an owner while Redis is frozen, and a Redis that restarts empty.

Real redis-server and rnnserve-server processes, as in test_cluster.py."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rnnserve import RnnServeError, SessionNotFound

from tests.test_cluster import TEXT, start_replicas

if TYPE_CHECKING:
    from tests.cluster_fixtures import RedisProcess
    from tests.conftest import ServerFactory, ServerHandle

pytestmark = pytest.mark.timeout(180)


def race(calls: list[Callable[[], object]]) -> list[object]:
    """Run the calls at once (each in its own thread, released together); each one's result,
    or the RnnServeError it raised."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], object]) -> object:
        barrier.wait(30)
        try:
            return call()
        except RnnServeError as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def concurrent_deletes(replicas: list[ServerHandle], count: int = 20) -> list[object]:
    """``count`` DeleteSession calls of one session at once, spread over the replicas."""
    with replicas[0].client() as client:
        client.create_session(TEXT, session_id="gone", hidden_size=16, seed=1)
    clients = [replicas[i % len(replicas)].client() for i in range(count)]
    try:
        return race([client.session("gone").delete for client in clients])
    finally:
        for client in clients:
            client.close()


def assert_one_delete_won(results: list[object]) -> None:
    winners = [r for r in results if r is None]
    losers = [r for r in results if r is not None]
    assert len(winners) == 1, results
    assert all(isinstance(r, SessionNotFound) for r in losers), losers


def test_concurrent_deletes_of_one_id_one_succeeds(server_factory: ServerFactory) -> None:
    server = server_factory()
    assert_one_delete_won(concurrent_deletes([server]))
    with server.client() as client:
        assert list(client.list_sessions()) == []


def test_concurrent_deletes_of_one_id_on_a_cluster_one_succeeds(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    replicas = start_replicas(server_factory, redis_server, tmp_path / "shared", count=2)
    assert_one_delete_won(concurrent_deletes(replicas))
    with replicas[1].client() as client:
        assert list(client.list_sessions()) == []
