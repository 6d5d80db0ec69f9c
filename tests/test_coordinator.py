"""The cluster coordinator against a real redis-server: leases, fencing tokens, the fenced
checkpoint pointer, the session directory, loss streams, and surviving a Redis restart."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError
from rnnserve_server.cluster import Coordinator, Lease, LeaseKeeper
from rnnserve_server.cluster.health import RedisHealth
from rnnserve_server.cluster.loss_stream import LossStreams

if TYPE_CHECKING:
    from tests.cluster_fixtures import RedisProcess


async def wait_until(
    condition: Callable[[], Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Poll an async condition until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.02)  # poll interval, not synchronisation: the loop re-checks


@pytest.fixture
async def coordinator(redis_server: RedisProcess) -> AsyncIterator[Coordinator]:
    coord = Coordinator(redis_server.url, lease_ttl=5.0)
    yield coord
    await coord.close()


async def test_concurrent_acquire_has_one_winner_per_session(redis_server: RedisProcess) -> None:
    # 40 competing "replicas" (separate clients) race for each of 5 sessions.
    replicas = [Coordinator(redis_server.url) for _ in range(8)]
    try:
        attempts = [
            replica.acquire(f"s{session}", f"10.0.0.{index}:50051")
            for session in range(5)
            for index, replica in enumerate(replicas)
            for _ in range(5)
        ]
        results = await asyncio.gather(*attempts)
        winners = [lease for lease in results if lease is not None]
        assert sorted(lease.session_id for lease in winners) == [f"s{i}" for i in range(5)]
        for lease in winners:
            assert await replicas[0].owner(lease.session_id) == lease.owner
            assert lease.token == await replicas[0].current_token(lease.session_id) == 1
    finally:
        for replica in replicas:
            await replica.close()


async def test_tokens_only_increase_across_owners(coordinator: Coordinator) -> None:
    tokens = []
    for index in range(5):
        lease = await coordinator.acquire("s", f"replica-{index}:1")
        assert lease is not None
        assert await coordinator.acquire("s", "other:1") is None  # held: nobody else gets it
        tokens.append(lease.token)
        assert await coordinator.release(lease)
        assert await coordinator.owner("s") is None
    assert tokens == sorted(set(tokens)) and tokens[0] >= 1


async def test_renew_keeps_the_lease_and_expiry_frees_it(redis_server: RedisProcess) -> None:
    coord = Coordinator(redis_server.url, lease_ttl=0.3)
    try:
        lease = await coord.acquire("s", "a:1")
        assert lease is not None
        # Renewing well inside the TTL, several TTLs long: the lease never lapses.
        keeper = LeaseKeeper(coord, lease, interval=0.05).start()
        await wait_until(lambda: _at_least(keeper, 12), what="12 renewals")
        assert await coord.owner("s") == "a:1"
        assert await coord.acquire("s", "b:1") is None
        assert keeper.failures == 0 and keeper.valid
        await keeper.stop(release=False)  # stop renewing, as a paused owner would
        await wait_until(lambda: _gone(coord, "s"), what="lease expiry")
        assert not await coord.renew(lease)  # expired: renew does not resurrect it
        taken = await coord.acquire("s", "b:1")
        assert taken is not None and taken.token > lease.token
        assert not await coord.release(lease)  # the old owner cannot drop the new lease
        assert await coord.owner("s") == "b:1"
    finally:
        await coord.close()


async def _at_least(keeper: LeaseKeeper, renewals: int) -> bool:
    return keeper.renewals >= renewals


async def _gone(coord: Coordinator, session_id: str) -> bool:
    return await coord.owner(session_id) is None


async def test_keeper_reports_a_lease_taken_over(redis_server: RedisProcess) -> None:
    coord = Coordinator(redis_server.url, lease_ttl=0.3)
    try:
        lease = await coord.acquire("s", "a:1")
        assert lease is not None
        lost: list[Lease] = []

        async def on_lost(which: Lease) -> None:
            lost.append(which)

        keeper = LeaseKeeper(coord, lease, on_lost, interval=0.05).start()
        # Someone deletes the lease and another replica takes it (as after a long pause).
        await coord.redis.delete(coord.key("s", "lease"))
        assert (await coord.acquire("s", "b:1")) is not None
        await asyncio.wait_for(keeper.lost.wait(), 10)
        assert lost == [lease] and not keeper.valid
        await keeper.stop()
        assert await coord.owner("s") == "b:1"  # stop() did not release b's lease
    finally:
        await coord.close()


async def test_stale_token_cannot_move_the_pointer(coordinator: Coordinator) -> None:
    old = await coordinator.acquire("s", "a:1")
    assert old is not None
    assert await coordinator.advance_pointer("s", old.token, f"{old.token}-10.npz")
    # a's lease lapses (a is paused) and b takes over with a newer token.
    await coordinator.redis.delete(coordinator.key("s", "lease"))
    new = await coordinator.acquire("s", "b:1")
    assert new is not None and new.token > old.token
    assert await coordinator.advance_pointer("s", new.token, f"{new.token}-8.npz")
    # a wakes up and tries to publish its step-20 checkpoint: rejected.
    assert not await coordinator.advance_pointer("s", old.token, f"{old.token}-20.npz")
    assert not await coordinator.advance_pointer("s", new.token + 1, "future-1.npz")
    assert await coordinator.pointer("s") == f"{new.token}-8.npz"


async def test_the_pointer_never_moves_back_to_an_earlier_step(
    coordinator: Coordinator,
) -> None:
    lease = await coordinator.acquire("s", "a:1")
    assert lease is not None
    assert await coordinator.advance_pointer("s", lease.token, f"{lease.token}-20.npz")
    # A pointer move whose caller timed out on a stalled Redis, reaching it after a later one.
    assert await coordinator.advance_pointer("s", lease.token, f"{lease.token}-10.npz")
    assert await coordinator.pointer("s") == f"{lease.token}-20.npz"
    assert await coordinator.advance_pointer("s", lease.token, f"{lease.token}-20.npz")
    assert await coordinator.advance_pointer("s", lease.token, f"{lease.token}-21.npz")
    assert await coordinator.pointer("s") == f"{lease.token}-21.npz"


async def test_stream_history_live_and_restored(redis_server: RedisProcess) -> None:
    writer = Coordinator(redis_server.url, stream_maxlen=1000)
    watcher = Coordinator(redis_server.url)
    try:
        for step in range(1, 6):
            await writer.publish_loss("s", step, 4.0 - step * 0.1, token=1)
        history = await watcher.read_loss("s", "0")
        assert [(e.kind, e.step) for e in history] == [("loss", s) for s in range(1, 6)]
        assert history[-1].loss == pytest.approx(3.5) and history[0].token == 1

        # Live: a blocked reader wakes with the next entry (a failover's restored event).
        last = history[-1].id
        reader = asyncio.create_task(watcher.read_loss("s", last, block=4.0))
        await wait_until(lambda: _blocked_clients(writer, 1), what="XREAD BLOCK waiting")
        restored_id = await writer.publish_restored("s", 3, token=2)
        live = await asyncio.wait_for(reader, 10)
        assert [(e.kind, e.step, e.token) for e in live] == [("restored", 3, 2)]
        assert live[0].id == restored_id

        # Resumable by id: reconnecting after the restored event misses nothing.
        await writer.publish_loss("s", 4, 3.7, token=2)
        after = await watcher.read_loss("s", restored_id)
        assert [(e.kind, e.step) for e in after] == [("loss", 4)]
        assert await watcher.last_stream_id("s") == after[0].id
        assert await watcher.read_loss("s", after[0].id, block=0.05) == []
    finally:
        await writer.close()
        await watcher.close()


async def test_a_publish_that_timed_out_but_went_through_is_not_appended_twice(
    redis_server: RedisProcess,
) -> None:
    """An owner whose publish timed out on a stalled Redis sends the same points again; the
    first call was executed all the same once Redis ran again: each step is on the stream
    once (a watcher replaying it would see an unannounced step back)."""
    redis = redis_server.process
    assert redis is not None
    writer = Coordinator(redis_server.url, op_timeout=0.5)
    try:
        await writer.publish_losses("s", 1, [3.0, 2.9], token=1)
        redis.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(RedisTimeoutError):
                await writer.publish_losses("s", 3, [2.8, 2.7], token=1, validation={4: 2.75})
        finally:
            redis.send_signal(signal.SIGCONT)

        async def went_through() -> bool:
            last = await writer.last_event("s")
            return last is not None and last.step == 4

        await wait_until(went_through, what="the timed-out publish executed")
        await writer.publish_losses("s", 3, [2.8, 2.7, 2.6], token=1)  # again, and step 5
        # A new owner (token 2) restored at step 2 publishes steps 3 and 4 again: kept.
        await writer.publish_restored("s", 2, token=2)
        await writer.publish_losses("s", 3, [2.85, 2.8], token=2)
        events = await writer.read_loss("s", "0")
        assert [(e.kind, e.step, e.token) for e in events] == [
            *(("loss", step, 1) for step in range(1, 6)),
            ("restored", 2, 2),
            ("loss", 3, 2),
            ("loss", 4, 2),
        ]
        assert [e.validation for e in events[:5]] == [None, None, None, 2.75, None]
        assert [e.loss for e in events[-2:]] == [2.85, 2.8]
    finally:
        await writer.close()


async def test_a_stream_watcher_outlives_a_read_that_timed_out(
    redis_server: RedisProcess,
) -> None:
    """WatchLoss on a replica that does not own the session follows its stream with a blocked
    read; one that times out (a stalled Redis, a busy machine) is sent again from where it was,
    and the watcher goes on instead of ending with an error."""
    redis = redis_server.process
    assert redis is not None
    reader = Coordinator(redis_server.url, lease_ttl=6.0, op_timeout=0.5)
    writer = Coordinator(redis_server.url)
    registry = SimpleNamespace(shutting_down=False, sessions={})
    streams = LossStreams(reader, lambda: registry)
    await writer.register("s")
    await writer.publish_losses("s", 1, [3.0], token=1)
    source = await streams.watch("s", 1)
    assert source is not None
    watched = aiter(source)
    try:
        assert [p.step for p in (await anext(watched)).points] == [1]
        await wait_until(lambda: _blocked_clients(writer, 1), what="the tail's XREAD BLOCK")
        redis.send_signal(signal.SIGSTOP)
        try:
            # Sent after the tail's read, on the same loop with the same timeout: once this
            # one timed out, the tail's has too.
            with pytest.raises(RedisTimeoutError):
                await reader.read_loss("s", "0")
        finally:
            redis.send_signal(signal.SIGCONT)
        await writer.publish_losses("s", 2, [2.9], token=1)
        following = await asyncio.wait_for(anext(watched), 10)
        assert [p.step for p in following.points] == [2]
    finally:
        await watched.aclose()  # type: ignore[attr-defined]
        await reader.close()
        await writer.close()


async def _blocked_clients(coord: Coordinator, at_least: int) -> bool:
    info = await coord.redis.info("clients")
    return int(info["blocked_clients"]) >= at_least


async def test_stream_retention_is_bounded(redis_server: RedisProcess) -> None:
    coord = Coordinator(redis_server.url, stream_maxlen=100)
    try:
        for step in range(2000):
            await coord.publish_loss("s", step, 1.0)
        kept = await coord.read_loss("s", "0", count=10_000)
        # MAXLEN ~ trims whole nodes, so a little more than 100 may stay; never all 2000.
        assert 100 <= len(kept) < 1000
        assert kept[-1].step == 1999
    finally:
        await coord.close()


async def test_directory_pages_by_id(coordinator: Coordinator) -> None:
    ids = [f"sess-{i:03d}" for i in range(25)]
    for session_id in reversed(ids):
        assert await coordinator.register(session_id)
    assert not await coordinator.register("sess-000")  # already there
    assert await coordinator.count() == 25
    seen: list[str] = []
    after = ""
    pages = 0
    while True:
        page, after = await coordinator.list_sessions(10, after)
        seen += page
        pages += 1
        if not after:
            break
    assert seen == ids and pages == 3
    await coordinator.unregister("sess-005")
    assert not await coordinator.exists("sess-005") and await coordinator.exists("sess-006")
    assert await coordinator.list_sessions(3, "sess-003") == (
        ["sess-004", "sess-006", "sess-007"],
        "sess-007",
    )


async def test_redis_restart_reconnects_and_keeps_tokens(
    redis_server: RedisProcess, coordinator: Coordinator
) -> None:
    lease = await coordinator.acquire("s", "a:1")
    assert lease is not None
    await coordinator.register("s")
    assert await coordinator.advance_pointer("s", lease.token, "1-5.npz")
    assert await coordinator.release(lease)

    redis_server.stop()
    assert not await coordinator.ping()  # health would say NOT_SERVING here
    redis_server.start()

    # Same client object: it reconnects by itself; the append-only file kept everything.
    assert await coordinator.ping()
    assert await coordinator.pointer("s") == "1-5.npz"
    assert await coordinator.list_sessions(10) == (["s"], "")
    again = await coordinator.acquire("s", "b:1")
    assert again is not None and again.token > lease.token


async def test_follow_yields_history_then_live_events(redis_server: RedisProcess) -> None:
    writer = Coordinator(redis_server.url)
    watcher = Coordinator(redis_server.url)
    try:
        await writer.publish_loss("s", 1, 2.0)
        got: list[tuple[str, int]] = []

        async def watch() -> None:
            async for event in watcher.follow("s", "0", block=0.2):
                got.append((event.kind, event.step))
                if len(got) == 4:
                    return

        task = asyncio.create_task(watch())
        await wait_until(lambda: _len_at_least(got, 1), what="history delivered")
        await writer.publish_loss("s", 2, 1.9)
        await writer.publish_restored("s", 1)
        await writer.publish_loss("s", 2, 1.95)
        await asyncio.wait_for(task, 10)
        assert got == [("loss", 1), ("loss", 2), ("restored", 1), ("loss", 2)]
    finally:
        await writer.close()
        await watcher.close()


async def _len_at_least(items: list[tuple[str, int]], n: int) -> bool:
    return len(items) >= n


async def test_keeper_counts_failures_and_gives_up_when_redis_is_gone(
    redis_server: RedisProcess,
) -> None:
    coord = Coordinator(redis_server.url, lease_ttl=1.0, op_timeout=0.5)
    try:
        lease = await coord.acquire("s", "a:1")
        assert lease is not None
        keeper = LeaseKeeper(coord, lease, interval=0.05).start()
        await wait_until(lambda: _at_least(keeper, 2), what="renewals")
        redis_server.kill()
        # Renewals fail; once the TTL has run out unrenewed the replica must stop owning.
        await asyncio.wait_for(keeper.lost.wait(), 20)
        assert keeper.failures >= 1 and keeper.consecutive_failures >= 1
        assert not keeper.valid
        await keeper.stop()  # releasing against a dead Redis does not raise
    finally:
        await coord.close()


async def test_health_goes_not_serving_while_redis_restarts(redis_server: RedisProcess) -> None:
    coord = Coordinator(redis_server.url, op_timeout=0.5)
    changes: list[bool] = []
    health = RedisHealth(coord, changes.append, interval=0.05).start()
    try:
        assert await health.check() and changes == []
        redis_server.stop()
        await wait_until(lambda: _serving_is(health, False), what="NOT_SERVING")
        redis_server.start()
        await wait_until(lambda: _serving_is(health, True), what="SERVING again")
        assert changes == [False, True]
        assert len(health.outages) == 1 and health.outages[0] > 0
        # Measured, not asserted: how long a Redis restart makes a replica unavailable.
        print(f"redis restart: replica NOT_SERVING for {health.outages[0]:.3f} s")
    finally:
        await health.stop()
        await coord.close()


async def _serving_is(health: RedisHealth, value: bool) -> bool:
    return health.serving is value
