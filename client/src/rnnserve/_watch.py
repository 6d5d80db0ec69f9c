"""Watches that reconnect, shared by the sync and asyncio clients (their streams only do the
I/O): when to open a WatchLoss or WatchJob again, from where, and what the new connection's
messages mean.

Watching changes nothing on the server, so a watch cut off by anything but the server's
answer to the request itself (UNAVAILABLE, a proxy's reset, a stream that ended before its
end, a replica moving the session: ``rnnserve._retry.worth_retrying``) is opened again, with
backoff, for up to ``retry_for`` seconds since the last message. It resumes after the last
step it delivered (WatchLoss ``from_step``; WatchJob starts with the job as it is now and
reports already delivered are dropped). A session that restarted from a checkpoint behind
that step is a rollback, reported once in ``rollbacks``. ``timeout`` stays the deadline of
the whole watch.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

import grpc

from rnnserve._retry import Retries
from rnnserve.errors import RnnServeError, ServerUnavailable
from rnnserve.v1 import rnn_service_pb2 as pb

# The states of a job that has ended.
ENDED = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_STOPPED, pb.JOB_STATE_FAILED})


# A watch also waits for a newer replica to take a session whose checkpoint is of a newer
# format than the replica it reached reads (a rolling upgrade): it only reads.
WATCH_REASONS = frozenset({"NEWER_FORMAT"})


M = TypeVar("M")
T = TypeVar("T")


class Reconnects(Generic[M, T]):
    """One watch's reconnections: the deadline, the backoff and the retry window; subclasses
    say what to ask (``request``) and what a message delivers (``deliver``)."""

    def __init__(self, retry_for: float, timeout: float | None) -> None:
        self.rollbacks: list[int] = []  # steps the watched session or job went back to
        self._retries = Retries(retry_for, reasons=WATCH_REASONS)
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self.reconnects = 0  # times the watch was opened again after it was cut off
        self.gone = False  # a reconnection found the session (or job) deleted
        self._fresh = True  # no message yet on the current connection

    def time_left(self) -> float | None:
        """Seconds left of ``timeout`` (None: no deadline): the next connection's deadline."""
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def request(self) -> Any:
        """The next connection's request."""
        raise NotImplementedError

    def deliver(self, message: M) -> Iterable[T]:
        """What one message of the watch delivers to its reader."""
        raise NotImplementedError

    def finished(self) -> bool:
        """True if the watch reached its end (a clean end then ends it)."""
        return False

    def after(self, error: RnnServeError | None) -> float | None:
        """The connection ended, with ``error`` (None: cleanly): seconds to wait before
        opening the watch again, or None to end it (``error`` is raised; a clean end, or
        ``gone``, ends the iteration)."""
        if error is None and self.finished():
            return None
        if error is not None and error.code == grpc.StatusCode.NOT_FOUND and self.reconnects:
            self.gone = True  # deleted while we reconnected: the end, as a live watch sees it
            return None
        cause = error or ServerUnavailable("the watch ended before its end")
        try:
            delay = self._retries.delay(cause)
        except RnnServeError:
            return None
        left = self.time_left()
        if left is not None and delay >= left:
            return None
        self.reconnects += 1
        self._fresh = True
        return delay

    def _message(self) -> bool:
        """A message arrived; True if it is the first of its connection."""
        self._retries.progressed()
        fresh, self._fresh = self._fresh, False
        return fresh


class LossWatch(Reconnects[pb.WatchLossResponse, pb.LossPoint]):
    """A WatchLoss that reconnects: ``request()`` for each connection, ``deliver`` turns
    its messages into the points not yet delivered."""

    def __init__(
        self, session_id: str, from_step: int, retry_for: float, timeout: float | None
    ) -> None:
        super().__init__(retry_for, timeout)
        self._session_id = session_id
        self._first = from_step
        self.last: int | None = None  # the last step delivered

    def request(self) -> pb.WatchLossRequest:
        """The next connection's request: from the step after the last one delivered."""
        from_step = self._first if self.last is None else self.last + 1
        return pb.WatchLossRequest(session_id=self._session_id, from_step=from_step)

    def deliver(self, message: pb.WatchLossResponse) -> Iterable[pb.LossPoint]:
        self._message()
        if message.HasField("restored_at_step"):
            self.rollbacks.append(message.restored_at_step)
            if self.last is not None:
                self.last = min(self.last, message.restored_at_step)
        points = [p for p in message.points if self.last is None or p.step > self.last]
        if points:
            self.last = points[-1].step
        return points


class JobWatch(Reconnects[pb.WatchJobResponse, pb.TrainResponse]):
    """A WatchJob that reconnects: ``deliver`` turns its messages into the progress reports
    not yet delivered and keeps ``job``, the newest Job seen."""

    def __init__(self, job: pb.Job, retry_for: float, timeout: float | None) -> None:
        super().__init__(retry_for, timeout)
        self.job = job
        self.last = -1  # the step of the last report delivered

    def request(self) -> pb.WatchJobRequest:
        return pb.WatchJobRequest(name=self.job.name)

    def finished(self) -> bool:
        return self.job.state in ENDED

    def deliver(self, message: pb.WatchJobResponse) -> Iterable[pb.TrainResponse]:
        fresh = self._message()
        self.job = message.job
        if message.HasField("restored_at_step"):
            back = message.restored_at_step
        elif fresh and self.reconnects:
            back = message.job.step  # where the job is now: behind us if it rolled back
        else:
            back = self.last
        if 0 <= back < self.last:
            self.rollbacks.append(back)
            self.last = back
        if not message.HasField("progress"):
            return ()
        progress = message.progress
        if progress.stop_reason and not self.finished():
            return ()  # the job left that replica (drained): not its end
        if progress.step <= self.last and not progress.stop_reason:
            return ()  # delivered before the reconnection
        self.last = max(self.last, progress.step)
        return (progress,)
