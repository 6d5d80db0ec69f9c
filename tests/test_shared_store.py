"""Fenced checkpoints on a shared directory, with the pointer in a real redis-server."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rnnserve_server.cluster import (
    CheckpointMissingError,
    Coordinator,
    SharedStore,
    StaleTokenError,
)

if TYPE_CHECKING:
    from tests.cluster_fixtures import RedisProcess


@pytest.fixture
async def coordinator(redis_server: RedisProcess) -> AsyncIterator[Coordinator]:
    coord = Coordinator(redis_server.url)
    yield coord
    await coord.close()


def blobs(store: SharedStore, session_id: str) -> list[str]:
    return sorted(os.listdir(store.session_dir(session_id)))


async def test_put_then_latest_round_trips_bytes(
    redis_server: RedisProcess, coordinator: Coordinator, tmp_path: Path
) -> None:
    store = SharedStore(tmp_path / "shared", coordinator)
    assert await store.latest("s") is None
    lease = await coordinator.acquire("s", "a:1")
    assert lease is not None
    payload = os.urandom(100_000)
    name = await store.put("s", lease.token, 7, payload)
    assert name == f"{lease.token}-7.npz"
    # Another replica, with its own client, reads what the pointer names.
    other = Coordinator(redis_server.url)
    try:
        got = await SharedStore(tmp_path / "shared", other).latest("s")
    finally:
        await other.close()
    assert got is not None and (got.token, got.step, got.data) == (lease.token, 7, payload)
    assert blobs(store, "s") == [name]  # no temporary file left behind


async def test_old_owner_cannot_publish_after_takeover(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    store = SharedStore(tmp_path / "shared", coordinator)
    old = await coordinator.acquire("s", "a:1")
    assert old is not None
    await store.put("s", old.token, 10, b"old-10")
    # a is paused past its lease; b takes over and restores from step 10.
    await coordinator.redis.delete(coordinator.key("s", "lease"))
    new = await coordinator.acquire("s", "b:1")
    assert new is not None
    restored = await store.latest("s")
    assert restored is not None and restored.data == b"old-10"
    await store.put("s", new.token, 12, b"new-12")
    # a resumes and writes its step-20 state: refused, the blob it wrote is gone.
    with pytest.raises(StaleTokenError, match="another replica owns it"):
        await store.put("s", old.token, 20, b"old-20")
    latest = await store.latest("s")
    assert latest is not None and (latest.token, latest.step, latest.data) == (
        new.token,
        12,
        b"new-12",
    )
    assert f"{old.token}-20.npz" not in blobs(store, "s")


async def test_gc_keeps_the_referenced_blob_and_in_flight_ones(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    store = SharedStore(tmp_path / "shared", coordinator, gc_grace=3600)
    first = await coordinator.acquire("s", "a:1")
    assert first is not None
    for step in (1, 2, 3):
        await store.put("s", first.token, step, f"a{step}".encode())
    await coordinator.release(first)
    second = await coordinator.acquire("s", "b:1")
    assert second is not None
    await store.put("s", second.token, 3, b"b3")
    directory = store.session_dir("s")
    # A put that renamed its blob but has not moved the pointer yet, and a crashed writer's
    # temporary file: both young, both kept.
    (directory / f"{second.token}-4.npz").write_bytes(b"b4")
    (directory / f".tmp-{second.token}-5.npz.1234").write_bytes(b"partial")

    removed = await store.gc("s")
    assert removed == [f"{first.token}-{step}.npz" for step in (1, 2, 3)]
    assert blobs(store, "s") == sorted(
        [f".tmp-{second.token}-5.npz.1234", f"{second.token}-3.npz", f"{second.token}-4.npz"]
    )
    latest = await store.latest("s")
    assert latest is not None and latest.data == b"b3"

    # Past the grace period the temporary file goes; the blob ahead of the pointer stays
    # while its token is the session's newest (its writer may still move the pointer there).
    store.gc_grace = 0.0
    assert await store.gc("s") == [f".tmp-{second.token}-5.npz.1234"]
    assert blobs(store, "s") == [f"{second.token}-3.npz", f"{second.token}-4.npz"]
    # Once a newer owner took the session, that writer can never move the pointer: it goes.
    await coordinator.release(second)
    third = await coordinator.acquire("s", "c:1")
    assert third is not None
    assert await store.gc("s") == [f"{second.token}-4.npz"]
    assert blobs(store, "s") == [f"{second.token}-3.npz"]  # the referenced blob, always


async def test_sweep_collects_every_session_but_only_old_blobs(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    store = SharedStore(tmp_path / "shared", coordinator, gc_grace=3600)
    for session_id in ("a", "b"):
        lease = await coordinator.acquire(session_id, "a:1")
        assert lease is not None
        await store.put(session_id, lease.token, 5, b"latest")
        directory = store.session_dir(session_id)
        # Left behind where no later put cleans up: an older blob, a crashed writer's file.
        (directory / f"{lease.token}-1.npz").write_bytes(b"old")
        (directory / f".tmp-{lease.token}-6.npz.99").write_bytes(b"partial")
    # A directory with no pointer (a session being created, or one Redis lost): untouched.
    orphan = store.session_dir("c")
    orphan.mkdir()
    (orphan / "1-1.npz").write_bytes(b"unknown")

    assert await store.sweep() == (3, 0)  # everything is younger than the grace period
    assert blobs(store, "a") == [".tmp-1-6.npz.99", "1-1.npz", "1-5.npz"]
    store.gc_grace = 0.0
    assert await store.sweep() == (3, 4)
    for session_id in ("a", "b"):
        assert blobs(store, session_id) == ["1-5.npz"]
        latest = await store.latest(session_id)
        assert latest is not None and latest.data == b"latest"
    assert blobs(store, "c") == ["1-1.npz"]


async def test_missing_blob_is_reported_not_hidden(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    store = SharedStore(tmp_path / "shared", coordinator)
    lease = await coordinator.acquire("s", "a:1")
    assert lease is not None
    name = await store.put("s", lease.token, 1, b"x")
    (store.session_dir("s") / name).unlink()
    with pytest.raises(CheckpointMissingError, match="missing from the shared directory"):
        await store.latest("s")


async def test_concurrent_writers_one_token_wins(coordinator: Coordinator, tmp_path: Path) -> None:
    store = SharedStore(tmp_path / "shared", coordinator)
    tokens = []
    for replica in ("a:1", "b:1", "c:1"):
        lease = await coordinator.acquire("s", replica)
        assert lease is not None
        tokens.append(lease.token)
        await coordinator.release(lease)
    # Three "owners" (only the last token is current) write at once.
    results = await asyncio.gather(
        *(store.put("s", token, 50 + i, f"t{token}".encode()) for i, token in enumerate(tokens)),
        return_exceptions=True,
    )
    assert [isinstance(r, StaleTokenError) for r in results] == [True, True, False]
    latest = await store.latest("s")
    assert latest is not None and latest.token == tokens[-1]
    assert blobs(store, "s") == [f"{tokens[-1]}-52.npz"]


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "../x"])
async def test_ids_that_are_not_a_directory_name_are_refused(
    coordinator: Coordinator, tmp_path: Path, bad: str
) -> None:
    store = SharedStore(tmp_path / "shared", coordinator)
    with pytest.raises(ValueError, match="cannot be a directory name"):
        await store.put(bad, 1, 1, b"x")
