"""Activating a session on a replica (lease + latest checkpoint + announced rollback), with a
real redis-server and a shared directory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rnnserve_server.cluster import (
    Activation,
    Coordinator,
    LeaseKeeper,
    Ownership,
    SharedStore,
    activate,
)

if TYPE_CHECKING:
    from tests.cluster_fixtures import RedisProcess


@pytest.fixture
async def cluster(
    redis_server: RedisProcess, tmp_path: Path
) -> AsyncIterator[list[tuple[Ownership, SharedStore]]]:
    replicas = []
    for i in range(2):
        coord = Coordinator(redis_server.url, lease_ttl=0.5)
        replicas.append((Ownership(coord, f"127.0.0.1:{6000 + i}"), SharedStore(tmp_path, coord)))
    yield replicas
    for ownership, _ in replicas:
        await ownership.release_all()
        await ownership.coordinator.close()


async def test_a_new_session_activates_at_step_zero(
    cluster: list[tuple[Ownership, SharedStore]],
) -> None:
    (a, a_store), (b, b_store) = cluster
    got = await activate(a, a_store, "s")
    assert isinstance(got, Activation)
    assert (got.step, got.checkpoint, got.rolled_back_from) == (0, None, None)
    assert await activate(b, b_store, "s") == a.address  # b forwards to a


async def test_graceful_hand_over_announces_nothing(
    cluster: list[tuple[Ownership, SharedStore]],
) -> None:
    (a, a_store), (b, b_store) = cluster
    got = await activate(a, a_store, "s")
    assert isinstance(got, Activation)
    for step in range(1, 11):
        await a.coordinator.publish_loss("s", step, 1.0, token=got.lease.token)
    await a_store.put("s", got.lease.token, 10, b"state@10")  # drain: checkpoint ...
    await a.release("s")  # ... then release
    moved = await activate(b, b_store, "s")
    assert isinstance(moved, Activation)
    assert moved.step == 10 and moved.rolled_back_from is None
    assert moved.checkpoint is not None and moved.checkpoint.data == b"state@10"
    events = await b.coordinator.read_loss("s", "0")
    assert [e.kind for e in events] == ["loss"] * 10


async def test_failover_announces_the_rollback_to_watchers(
    cluster: list[tuple[Ownership, SharedStore]],
) -> None:
    (a, a_store), (b, b_store) = cluster
    got = await activate(a, a_store, "s")
    assert isinstance(got, Activation)
    await a_store.put("s", got.lease.token, 5, b"state@5")
    for step in range(1, 9):
        await a.coordinator.publish_loss("s", step, 1.0, token=got.lease.token)
    # a dies: its keeper stops, nothing is released; b must wait for the lease to expire.
    keeper: LeaseKeeper = a._keepers["s"]
    await keeper.stop(release=False)
    # Until the lease expires b is told to forward to a (that call would fail: a is dead).
    deadline = time.monotonic() + 10
    moved = await activate(b, b_store, "s")
    while not isinstance(moved, Activation):
        assert moved == a.address and time.monotonic() < deadline, moved
        await asyncio.sleep(0.05)  # poll interval; the loop re-checks the lease
        moved = await activate(b, b_store, "s")
    assert moved.lease.token > got.lease.token
    assert (moved.step, moved.rolled_back_from) == (5, 8)
    last = await b.coordinator.last_event("s")
    assert last is not None and (last.kind, last.step, last.token) == (
        "restored",
        5,
        moved.lease.token,
    )
