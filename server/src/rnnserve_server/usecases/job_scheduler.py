"""Turns for training jobs: at most ``slots`` chunks compute at once; the others wait in the
order they asked (round robin, since a job asks again after each chunk), so a long job can't
starve a short one and interactive calls keep a core."""

from __future__ import annotations

import asyncio
import os
from collections import deque


def default_slots() -> int:
    """The cores this process may use (affinity, and the cgroup's CPU quota) minus one, >= 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores - 1)


class JobScheduler:
    """A fair semaphore (event loop only): ``acquire`` waits its turn, ``release`` hands the
    slot to the longest waiter."""

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> bool:
        """Take a slot if one is free and no one waits."""
        if self.running < self.slots and not self._waiting:
            self.running += 1
            return True
        return False

    async def acquire(self) -> None:
        """Until this caller holds a slot (FIFO). Cancelling it gives up the place."""
        if self.try_acquire():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # handed over just as it was cancelled: pass it on
            elif future in self._waiting:  # a release may have dropped it already
                self._waiting.remove(future)
            raise

    def release(self) -> None:
        """Give the slot to the next waiter, or free it."""
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_result(None)
                return
        self.running -= 1

    @property
    def waiting(self) -> int:
        return len(self._waiting)
