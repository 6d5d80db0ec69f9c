"""Per-replica lease tables (claim / forward / release / drain / loss) against a real
redis-server: the routing decision of cluster mode."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
from rnnserve_server.cluster import Coordinator, Lease, Ownership

if TYPE_CHECKING:
    from tests.cluster_fixtures import RedisProcess


@pytest.fixture
async def replicas(redis_server: RedisProcess) -> AsyncIterator[list[Ownership]]:
    tables = [
        Ownership(Coordinator(redis_server.url, lease_ttl=2.0), f"127.0.0.1:{5000 + i}")
        for i in range(3)
    ]
    yield tables
    for table in tables:
        await table.release_all()
        await table.coordinator.close()


async def test_each_session_has_one_owner_and_the_others_forward(
    replicas: list[Ownership],
) -> None:
    sessions = [f"s{i}" for i in range(30)]
    # Every replica claims every session at once, twice over.
    answers = await asyncio.gather(
        *(table.claim(sid) for sid in sessions for table in replicas for _ in range(2))
    )
    by_session: dict[str, list[Lease | str]] = {}
    for index, answer in enumerate(answers):
        by_session.setdefault(sessions[index // 6], []).append(answer)
    for sid, results in by_session.items():
        leases = {r for r in results if isinstance(r, Lease)}
        assert len(leases) == 1, sid  # both claims on the owner got the same lease
        (lease,) = leases
        assert all(r == lease.owner for r in results if isinstance(r, str))
        assert await replicas[0].coordinator.owner(sid) == lease.owner
    assert sum(len(t.owned()) for t in replicas) == 30


async def test_release_hands_the_session_on_with_a_newer_token(
    replicas: list[Ownership],
) -> None:
    a, b, _ = replicas
    first = await a.claim("s")
    assert isinstance(first, Lease)
    assert await b.claim("s") == a.address
    await a.release("s")
    assert a.owned() == [] and a.lease("s") is None
    second = await b.claim("s")
    assert isinstance(second, Lease) and second.token > first.token
    assert await a.claim("s") == b.address


async def test_a_restarted_replica_waits_out_its_own_old_lease(
    redis_server: RedisProcess,
) -> None:
    before = Ownership(Coordinator(redis_server.url, lease_ttl=0.5), "127.0.0.1:7000")
    after = Ownership(Coordinator(redis_server.url, lease_ttl=0.5), "127.0.0.1:7000")
    try:
        old = await before.claim("s")
        assert isinstance(old, Lease)
        # The process "dies": its keeper stops without releasing; a new process, same address.
        for keeper in list(before._keepers.values()):
            await keeper.stop(release=False)
        new = await after.claim("s", timeout=10)
        assert isinstance(new, Lease) and new.token > old.token  # not forwarded to itself
    finally:
        await after.release_all()
        await before.coordinator.close()
        await after.coordinator.close()


async def test_a_lease_taken_away_is_reported_and_dropped(redis_server: RedisProcess) -> None:
    lost: list[str] = []

    async def on_lost(session_id: str) -> None:
        lost.append(session_id)

    coord = Coordinator(redis_server.url, lease_ttl=0.6)
    table = Ownership(coord, "127.0.0.1:7001", on_lost)
    other = Ownership(Coordinator(redis_server.url, lease_ttl=0.6), "127.0.0.1:7002")
    try:
        assert isinstance(await table.claim("s"), Lease)
        keeper = table._keepers["s"]
        # A long pause elsewhere in the story: the lease disappears and another replica
        # takes the session; the keeper notices at its next renewal.
        await coord.redis.delete(coord.key("s", "lease"))
        assert isinstance(await other.claim("s"), Lease)
        await asyncio.wait_for(keeper.lost.wait(), 10)
        assert lost == ["s"] and table.leases_lost == 1 and table.owned() == []
        assert await table.claim("s") == other.address
    finally:
        await table.release_all()
        await other.release_all()
        await coord.close()
        await other.coordinator.close()


async def test_a_replicas_leases_are_renewed_together_in_few_round_trips(
    redis_server: RedisProcess,
) -> None:
    """100 owned sessions: each lease renewed every TTL/3 as usual, but in one pipeline a
    beat, not 100 calls (Redis load that grows with replicas, not with sessions)."""
    table = Ownership(Coordinator(redis_server.url, lease_ttl=0.3), "127.0.0.1:5999")
    try:
        for i in range(100):
            assert isinstance(await table.claim(f"r{i}"), Lease)
        async with asyncio.timeout(20):
            while min(keeper.renewals for keeper in table._keepers.values()) < 5:
                await asyncio.sleep(0.05)  # poll: every lease renewed at least 5 times
        renewals = sum(keeper.renewals for keeper in table._keepers.values())
        assert table.renewals.round_trips * 20 <= renewals  # in shared round trips
        assert len(table.owned()) == 100  # and none was lost
        for i in range(100):
            assert await table.coordinator.owner(f"r{i}") == table.address
    finally:
        await table.release_all()
        await table.coordinator.close()
