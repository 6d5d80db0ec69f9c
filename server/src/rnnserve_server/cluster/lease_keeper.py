"""Keeping leases: renew each in the background, and say once when one is lost.

A replica's keepers wake on the same beat (multiples of their interval on the event loop's
clock), and a :class:`RenewalBatcher` sends the renewals that come due together in one round
trip: a replica owning 10,000 sessions renews them in one pipeline a beat, not 10,000 calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from rnnserve_server.cluster.coordinator import Coordinator, Lease


class RenewalBatcher:
    """Renewals asked for in the same turn of the event loop go to Redis as one pipeline."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator
        self.round_trips = 0
        self._pending: list[tuple[Lease, asyncio.Future[bool]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def renew(self, lease: Lease) -> bool:
        """Like ``Coordinator.renew``, batched with the others due now."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((lease, future))
        if len(self._pending) == 1:  # the first of this turn sends the batch next turn
            task = asyncio.create_task(self._send())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _send(self) -> None:
        batch, self._pending = self._pending, []
        self.round_trips += 1
        try:
            results = await self.coordinator.renew_many([lease for lease, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # each renewal fails as a single call would
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), still_ours in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(still_ours)


class LeaseKeeper:
    """Renews one lease in the background until stopped or lost.

    Renews every ``ttl / 3`` (through ``renew``: a :class:`RenewalBatcher`'s, or the
    coordinator's own). A renewal that fails (Redis unreachable) is counted and retried;
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
        renew: Callable[[Lease], Awaitable[bool]] | None = None,
    ) -> None:
        self.coordinator = coordinator
        self._renew = renew if renew is not None else coordinator.renew
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
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            # The next multiple of the interval: every keeper of this replica wakes on the same
            # beat, so their renewals share a round trip (RenewalBatcher).
            beat = (loop.time() // self.interval + 1) * self.interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(beat):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            sent = time.monotonic()
            try:
                still_ours = await self._renew(self.lease)
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
