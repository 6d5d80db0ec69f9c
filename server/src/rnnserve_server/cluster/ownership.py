"""The leases one replica holds: claim a session (or learn who owns it), keep the claim
renewed, give it up on eviction or drain, and hear when it was lost.

This is the routing decision of cluster mode: ``claim`` answers either with our
:class:`~rnnserve_server.cluster.coordinator.Lease` (serve the call here; load the session
from the shared store if it is not resident) or with the owner's address (forward the call).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from rnnserve_server.cluster.coordinator import Coordinator, DirectoryLostError, Lease
from rnnserve_server.cluster.lease_keeper import LeaseKeeper, RenewalBatcher


class Ownership:
    """The sessions this replica (at ``address``) owns, each with a renewing lease."""

    def __init__(
        self,
        coordinator: Coordinator,
        address: str,
        on_lost: Callable[[str], Awaitable[None]] | None = None,
        restore_directory: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.address = address
        self.on_lost = on_lost
        # Called when Redis lost its data (DirectoryLostError): returns once the directory is
        # rebuilt, so the claim can go on.
        self.restore_directory = restore_directory
        self.leases_lost = 0  # leases that lapsed or were taken while we held them
        self._renew_failures_done = 0  # from keepers no longer running
        self._keepers: dict[str, LeaseKeeper] = {}
        self.renewals = RenewalBatcher(coordinator)  # one round trip per beat for all leases
        self._locks: dict[str, asyncio.Lock] = {}

    @property
    def renew_failures(self) -> int:
        """Lease renewals that failed (Redis unreachable), over all leases ever held."""
        running = sum(keeper.failures for keeper in self._keepers.values())
        return self._renew_failures_done + running

    def owned(self) -> list[str]:
        """Ids of the sessions whose lease this replica holds and can still trust."""
        return sorted(sid for sid, keeper in self._keepers.items() if keeper.valid)

    def lease(self, session_id: str) -> Lease | None:
        """Our live lease on the session (its token fences our writes), or None."""
        keeper = self._keepers.get(session_id)
        return keeper.lease if keeper is not None and keeper.valid else None

    async def claim(self, session_id: str, timeout: float | None = None) -> Lease | str:
        """Our lease on the session, taken now if no one holds it; or the owner's address.

        A lease still held under our own address that we do not know (this replica restarted
        within the TTL) is waited out, never forwarded to ourselves. Raises TimeoutError after
        ``timeout`` (default: twice the lease TTL), RedisError while Redis is unreachable, and
        DirectoryLostError if Redis lost its data and the directory is not rebuilt meanwhile.
        """
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            mine = self.lease(session_id)
            if mine is not None:
                return mine
            await self._forget(session_id)  # a keeper whose lease ran out
            wait = timeout if timeout is not None else 2 * self.coordinator.lease_ttl
            deadline = time.monotonic() + wait
            while True:
                try:
                    lease = await self.coordinator.acquire(session_id, self.address)
                except DirectoryLostError:
                    if self.restore_directory is None or time.monotonic() > deadline:
                        raise
                    await self.restore_directory()
                    continue
                if lease is not None:
                    self._keepers[session_id] = LeaseKeeper(
                        self.coordinator, lease, self._lost, renew=self.renewals.renew
                    ).start()
                    return lease
                owner = await self.coordinator.owner(session_id)
                if owner is not None and owner != self.address:
                    return owner
                # No owner (it expired between our two calls) or our own stale lease.
                if time.monotonic() > deadline:
                    raise TimeoutError(f"session {session_id!r}: no lease within {wait:g} s")
                await asyncio.sleep(min(0.05, self.coordinator.lease_ttl / 10))

    async def release(self, session_id: str) -> None:
        """Stop renewing and give the lease back (after the session was checkpointed)."""
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        async with lock:
            keeper = self._keepers.pop(session_id, None)
            if keeper is not None:
                await keeper.stop(release=True)
                self._renew_failures_done += keeper.failures

    async def release_all(self) -> None:
        """Give every lease back (graceful drain, after every session was checkpointed)."""
        for session_id in list(self._keepers):
            with contextlib.suppress(RedisError, OSError):
                await self.release(session_id)

    async def _forget(self, session_id: str) -> None:
        keeper = self._keepers.pop(session_id, None)
        if keeper is not None:
            await keeper.stop(release=False)
            self._renew_failures_done += keeper.failures

    async def _lost(self, lease: Lease) -> None:
        # Called from the keeper's own task: it ends right after, so drop it without awaiting.
        keeper = self._keepers.get(lease.session_id)
        if keeper is not None and keeper.lease == lease:
            del self._keepers[lease.session_id]
            self._renew_failures_done += keeper.failures
        self.leases_lost += 1
        if self.on_lost is not None:
            await self.on_lost(lease.session_id)
