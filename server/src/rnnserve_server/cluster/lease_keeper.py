"""Keeping one lease: renew it in the background, and say once when it is lost."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from rnnserve_server.cluster.coordinator import Coordinator, Lease


class LeaseKeeper:
    """Renews one lease in the background until stopped or lost.

    Renews every ``ttl / 3``. A renewal that fails (Redis unreachable) is counted and retried;
    once the lease's validity runs out without a successful renewal, or Redis says the lease is
    no longer ours, the keeper calls ``on_lost`` once and stops: from then on the replica must
    not act as the owner (its token may already be stale).
    """

    def __init__(
        self,
        coordinator: Coordinator,
        lease: Lease,
        on_lost: Callable[[Lease], Awaitable[None]] | None = None,
        *,
        interval: float | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.lease = lease
        self.on_lost = on_lost
        self.interval = interval if interval is not None else lease.ttl / 3
        self.renewals = 0
        self.failures = 0  # renewals that raised (total)
        self.consecutive_failures = 0
        self.lost = asyncio.Event()
        self._stop = asyncio.Event()
        self._valid_until = lease.acquired_at + lease.ttl
        self._task: asyncio.Task[None] | None = None

    @property
    def valid(self) -> bool:
        """True while the lease is certainly still ours (by the local clock)."""
        return not self.lost.is_set() and time.monotonic() < self._valid_until

    def start(self) -> LeaseKeeper:
        """Start renewing (in a task on the running loop)."""
        self._task = asyncio.create_task(self._run(), name=f"lease:{self.lease.session_id}")
        return self

    async def stop(self, release: bool = True) -> None:
        """Stop renewing; release the lease in Redis if ``release`` and it is still ours."""
        self._stop.set()
        if self._task is not None:
            await self._task
        if release and not self.lost.is_set():
            with contextlib.suppress(RedisError, OSError):
                await self.coordinator.release(self.lease)

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            sent = time.monotonic()
            try:
                still_ours = await self.coordinator.renew(self.lease)
            except (RedisError, OSError):
                self.failures += 1
                self.consecutive_failures += 1
                if time.monotonic() >= self._valid_until:
                    await self._lose()
                    return
                continue
            self.consecutive_failures = 0
            if not still_ours:
                await self._lose()
                return
            self.renewals += 1
            self._valid_until = sent + self.lease.ttl

    async def _lose(self) -> None:
        self.lost.set()
        if self.on_lost is not None:
            await self.on_lost(self.lease)
