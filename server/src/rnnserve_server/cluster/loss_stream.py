"""Each session's loss points on its Redis stream: the owner publishes them, watchers on the
other replicas follow them.

The owner runs one publisher task per active session: every loss point the session records
goes to the stream (with its validation loss, if one was measured), so a watcher on any
replica sees it, and a later owner knows the last step watchers saw. A replica that does not
own a session serves WatchLoss from the stream: every point whoever trains it, across
failovers, with the ``restored`` events a new owner appends turned into ``restored_at_step``.
Its watchers of one session share one reader of the stream (a :class:`Tail`: one blocked
Redis connection and one read per new batch, however many watch); a watcher still behind the
tail (catching up on history) reads Redis itself, without blocking.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from redis.exceptions import RedisError

from rnnserve_server.cluster.coordinator import Coordinator, StreamEvent, stream_event
from rnnserve_server.errors import StorageError

TAIL_EVENTS = 2000  # newest events a tail keeps for its watchers; slower ones read Redis


def _order(entry_id: str) -> tuple[int, int]:
    """A stream id ("<ms>-<seq>", or "0") as something that sorts like the stream."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _unreachable(session_id: str) -> StorageError:
    return StorageError(
        "the cluster coordinator (Redis) is not answering, so the session's loss can't be "
        "followed; watch it again in a moment",
        session_id=session_id,
    )


class Tail:
    """One reader of a session's stream for all its watchers on this replica: it waits on
    Redis for new entries and keeps the newest ``TAIL_EVENTS`` in memory."""

    def __init__(self, coordinator: Coordinator, session_id: str, start_id: str) -> None:
        self.coordinator = coordinator
        self.session_id = session_id
        self.base = start_id  # the tail holds every event after this id
        self.events: list[StreamEvent] = []
        self.keys: list[tuple[int, int]] = []
        self.watchers = 0
        self.ended = False  # the session was deleted, or reading failed (``error``)
        self.error: BaseException | None = None
        self._new = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def after(self, cursor: str) -> list[StreamEvent] | None:
        """The events after stream id ``cursor``, or None if the tail does not reach back
        that far (read Redis instead)."""
        key = _order(cursor)
        if key < _order(self.base):
            return None
        return self.events[bisect.bisect_right(self.keys, key) :]

    async def wait(self, timeout: float) -> None:
        """Until new events arrive (or the tail ends), at most ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._new.wait()

    async def run(self, shutting_down: Callable[[], bool]) -> None:
        cursor = self.base
        failing_since: float | None = None
        while not shutting_down():
            try:
                events = await self.coordinator.read_loss(
                    self.session_id, cursor, count=1000, block=1.0
                )
                if not events and not await self.coordinator.exists(self.session_id):
                    break  # deleted
            except (RedisError, OSError) as exc:
                # A read that timed out (a busy machine, Redis restarting) is sent again from
                # the same id, so nothing is missed; Redis away for a lease TTL ends it.
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > self.coordinator.lease_ttl:
                    self.error = exc
                    break
                await asyncio.sleep(0.1)
                continue
            failing_since = None
            if events:
                cursor = events[-1].id
                self.events.extend(events)
                self.keys.extend(_order(e.id) for e in events)
                if len(self.events) > 2 * TAIL_EVENTS:  # trim in bulk, not per event
                    drop = len(self.events) - TAIL_EVENTS
                    self.base = self.events[drop - 1].id
                    del self.events[:drop], self.keys[:drop]
                self._wake()
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        woken, self._new = self._new, asyncio.Event()
        woken.set()


class LossStreams:
    """The publishers of the sessions active here, and WatchLoss from the streams."""

    def __init__(self, coordinator: Coordinator, registry: Callable[[], Any]) -> None:
        self.coordinator = coordinator
        self._registry = registry  # the Registry, once the node is attached
        self._publishers: dict[str, asyncio.Task[None]] = {}
        self._published: dict[str, int] = {}  # session id -> last step on its stream
        self._tails: dict[str, Tail] = {}

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
                        validation=session.losses.validation,
                    )
                    published += len(losses)
                    self._published[session_id] = published
                    continue
                except (RedisError, OSError):
                    pass  # retried at the next change
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
        first: Any = await coordinator.redis.xrange(coordinator.key(session_id, "loss"), count=1)
        if not first:
            return None  # never trained, or trained before streams: the owner has the history
        (entry_id, fields), *_ = first
        first_event = stream_event(str(entry_id), fields)
        if first_event.kind == "loss" and first_event.step > want:
            return None  # trimmed past from_step: the owner (or an activation) replays it
        return self._follow(session_id, want)

    async def _tail(self, session_id: str) -> Tail:
        """The session's shared tail, started at the stream's end if there is none yet."""
        tail = self._tails.get(session_id)
        if tail is None or tail.ended:
            start = await self.coordinator.last_stream_id(session_id)
            tail = self._tails.get(session_id)  # another watcher may have made one meanwhile
            if tail is None or tail.ended:
                tail = Tail(self.coordinator, session_id, start)
                tail.task = asyncio.create_task(tail.run(lambda: self._registry().shutting_down))
                self._tails[session_id] = tail
        tail.watchers += 1
        return tail

    def _untail(self, tail: Tail) -> None:
        tail.watchers -= 1
        if tail.watchers == 0 and tail.task is not None:
            tail.task.cancel()
            if self._tails.get(tail.session_id) is tail:
                del self._tails[tail.session_id]

    async def _follow(self, session_id: str, want: int) -> AsyncIterator[Any]:
        from rnnserve.v1 import rnn_service_pb2 as pb

        last = want - 1
        cursor = "0"
        tail = await self._tail(session_id)
        try:
            while not self._registry().shutting_down:
                events = tail.after(cursor)
                if events is None:  # catching up on history: read it, without blocking
                    try:
                        events = await self.coordinator.read_loss(session_id, cursor, count=1000)
                    except (RedisError, OSError) as exc:
                        raise _unreachable(session_id) from exc
                if not events:
                    if tail.error is not None:
                        raise _unreachable(session_id) from tail.error
                    if tail.ended:
                        return  # deleted
                    await tail.wait(1.0)
                    continue
                cursor = events[-1].id
                points: list[Any] = []
                for event in events:
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
        finally:
            self._untail(tail)
