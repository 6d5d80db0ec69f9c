"""Redis reachability as a health signal: a replica cannot take leases, fence writes or list
sessions without Redis, so it reports NOT_SERVING while Redis does not answer.

:class:`RedisHealth` pings every ``interval`` seconds and calls ``on_change(serving)`` when the
answer flips (the wiring sets grpc.health.v1's status there). It also keeps how long Redis was
unreachable, per outage and in total, for metrics and for the Redis-restart measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from rnnserve_server.cluster.coordinator import Coordinator


class RedisHealth:
    """Watches Redis; ``serving`` is False from the first failed ping to the next good one."""

    def __init__(
        self,
        coordinator: Coordinator,
        on_change: Callable[[bool], None] | None = None,
        *,
        interval: float = 1.0,
    ) -> None:
        self.coordinator = coordinator
        self.on_change = on_change
        self.interval = interval
        self.serving = True
        self.outages: list[float] = []  # seconds each finished outage lasted
        self._down_since: float | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def unavailable_seconds(self) -> float:
        """Total time Redis was seen unreachable, the current outage included."""
        current = time.monotonic() - self._down_since if self._down_since is not None else 0.0
        return sum(self.outages) + current

    async def check(self) -> bool:
        """Ping once, update the state (calling ``on_change`` on a flip); the new state."""
        ok = await self.coordinator.ping()
        now = time.monotonic()
        if ok and self._down_since is not None:
            self.outages.append(now - self._down_since)
            self._down_since = None
        elif not ok and self._down_since is None:
            self._down_since = now
        if ok != self.serving:
            self.serving = ok
            if self.on_change is not None:
                self.on_change(ok)
        return ok

    def start(self) -> RedisHealth:
        """Start watching in a task on the running loop."""
        self._task = asyncio.create_task(self._run(), name="redis-health")
        return self

    async def stop(self) -> None:
        """Stop watching."""
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.check()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._stop.wait()
