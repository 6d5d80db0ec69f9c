"""Each session's loss points on its Redis stream: the owner publishes them, watchers on the
other replicas follow them.

The owner runs one publisher task per active session: every loss point the session records
goes to the stream (with its validation loss, if one was measured), so a watcher on any
replica sees it, and a later owner knows the last step watchers saw. A replica that does not
own a session serves WatchLoss from the stream: every point whoever trains it, across
failovers, with the ``restored`` events a new owner appends turned into ``restored_at_step``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from redis.exceptions import RedisError

from rnnserve_server.cluster.coordinator import Coordinator, _event


class LossStreams:
    """The publishers of the sessions active here, and WatchLoss from the streams."""

    def __init__(self, coordinator: Coordinator, registry: Callable[[], Any]) -> None:
        self.coordinator = coordinator
        self._registry = registry  # the Registry, once the node is attached
        self._publishers: dict[str, asyncio.Task[None]] = {}
        self._published: dict[str, int] = {}  # session id -> last step on its stream
        self.publish_failures = 0

    # -- publishing (the owner) ---------------------------------------------------------------

    def publishing(self, session_id: str) -> bool:
        """True if a publisher runs for the session here."""
        return session_id in self._publishers

    def start(
        self, session_id: str, session: Any, token: int, published: int | None = None
    ) -> None:
        """Publish the session's points after step ``published`` (default: its current step;
        earlier points were published by whoever trained them) under the lease ``token``."""
        self.stop(session_id)
        start = session.step if published is None else published
        task = asyncio.create_task(self._publish_loop(session_id, session, token, start))
        self._publishers[session_id] = task

    def stop(self, session_id: str) -> None:
        """Stop publishing the session's points (it left this replica)."""
        task = self._publishers.pop(session_id, None)
        if task is not None:
            task.cancel()

    async def _publish_loop(
        self, session_id: str, session: Any, token: int, published: int
    ) -> None:
        self._published[session_id] = published
        sessions = self._registry().sessions
        while sessions.get(session_id) is session and not session.deleted:
            changed = session.changed()
            if session.step > published:
                losses = [float(v) for v in session.history(published, session.step)]
                try:
                    await self.coordinator.publish_losses(
                        session_id,
                        published + 1,
                        losses,
                        token=token,
                        validation=session.validation,
                    )
                    published += len(losses)
                    self._published[session_id] = published
                    continue
                except (RedisError, OSError):
                    self.publish_failures += 1  # retried at the next change
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await changed.wait()

    async def flush_and_stop(self, timeout: float = 5.0) -> None:
        """Drain: let every publisher put the last points of stopped Trains on the streams
        (up to ``timeout``), then stop them all."""
        sessions = self._registry().sessions
        deadline = time.monotonic() + timeout
        for session_id, task in list(self._publishers.items()):
            session = sessions.get(session_id)
            while (
                session is not None
                and session.resident
                and self._published.get(session_id, session.step) < session.step
                and not task.done()
                and time.monotonic() < deadline
            ):
                session.notify()
                await asyncio.sleep(0.01)  # the publisher runs on this loop: let it
        for session_id in list(self._publishers):
            task = self._publishers.pop(session_id)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RedisError, OSError):
                await task

    # -- following (WatchLoss on any replica) -------------------------------------------------

    async def watch(self, session_id: str, from_step: int) -> AsyncIterator[Any] | None:
        """WatchLoss from the session's stream, or None when the stream cannot serve it (no
        such session, or history from ``from_step`` no longer on the stream): the caller
        routes the call as usual."""
        want = max(from_step, 1)
        coordinator = self.coordinator
        if not await coordinator.exists(session_id):
            return None
        first: Any = await coordinator.redis.xrange(coordinator._key(session_id, "loss"), count=1)
        if not first:
            return None  # never trained, or trained before streams: the owner has the history
        (entry_id, fields), *_ = first
        first_event = _event(str(entry_id), fields)
        if first_event.kind == "loss" and first_event.step > want:
            return None  # trimmed past from_step: the owner (or an activation) replays it
        return self._follow(session_id, want)

    async def _follow(self, session_id: str, want: int) -> AsyncIterator[Any]:
        from rnnserve.v1 import rnn_service_pb2 as pb

        last = want - 1
        cursor = "0"
        while not self._registry().shutting_down:
            events = await self.coordinator.read_loss(session_id, cursor, count=1000, block=1.0)
            if not events:
                if not await self.coordinator.exists(session_id):
                    return  # deleted
                continue
            points: list[Any] = []
            for event in events:
                cursor = event.id
                if event.kind == "restored":
                    if event.step < last:  # the watcher saw steps that were lost: say so
                        if points:
                            yield pb.WatchLossResponse(points=points)
                            points = []
                        yield pb.WatchLossResponse(restored_at_step=event.step)
                        last = event.step
                    continue
                if event.step <= last or event.loss is None:
                    continue  # already sent
                point = pb.LossPoint(step=event.step, loss=event.loss)
                if event.validation is not None:
                    point.validation_loss = event.validation
                points.append(point)
                last = event.step
            if points:
                yield pb.WatchLossResponse(points=points)
