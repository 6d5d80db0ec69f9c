"""``Session.train_to``'s decisions, shared by the sync and asyncio clients (their loops only
do the I/O): what a Train toward a target step saw, when it is done, and when and how long to
wait before retrying it (``rnnserve._retry``)."""

from __future__ import annotations

import time
from collections.abc import Callable

from rnnserve._retry import Retries
from rnnserve.errors import RnnServeError
from rnnserve.v1 import rnn_service_pb2 as pb


class TrainToResult:
    """What ``Session.train_to`` did: the last Train message (``final``), the retries it
    needed, the rollbacks it saw (``(step seen, step restored at)``: steps trained again) and
    whether it stopped at its ``max_seconds`` (``timed_out``) before the target."""

    def __init__(self) -> None:
        self.final: pb.TrainResponse | None = None
        self.retries = 0
        self.rollbacks: list[tuple[int, int]] = []
        self.timed_out = False


class TrainToRun:
    """One ``train_to`` call in progress: its result so far and its retry policy."""

    def __init__(
        self,
        retry_for: float,
        max_seconds: float | None,
        on_progress: Callable[[pb.TrainResponse], None] | None,
        on_retry: Callable[[RnnServeError, float], None] | None,
    ) -> None:
        self.result = TrainToResult()
        self._retries = Retries(retry_for, while_busy=True)  # an old owner's Train may be ending
        self._stop_at = None if max_seconds is None else time.monotonic() + max_seconds
        self._on_progress = on_progress
        self._on_retry = on_retry
        self._seen = 0  # the session's step as last seen (after a rollback: where it went)
        self._first = False  # the next message is the try's first

    def started(self, step: int) -> None:
        """A try starts with the session at ``step`` (GetSession's): a rollback if the step
        last seen is ahead of it. Once reported, the rollback's step is the one seen: a
        later try that finds the steps after it trained again is no new rollback."""
        self._went_to(step)
        self._first = True

    def progress(self, message: pb.TrainResponse) -> None:
        """One Train message. The try's first says where its Train started (the replica that
        runs it may have restored the session after GetSession answered): a rollback too if
        that is behind the step last seen."""
        self._retries.progressed()
        if self._first:
            self._first = False
            self._went_to(message.step - message.steps_done)
        self._seen = max(self._seen, message.step)
        self.result.final = message
        if self._on_progress is not None:
            self._on_progress(message)

    def _went_to(self, step: int) -> None:
        if step < self._seen:
            self.result.rollbacks.append((self._seen, step))
        self._seen = step

    def done(self) -> bool:
        """After a try's stream ended: True if it ended for a reason a retry would not change
        (completed, diverged, stopped early, deleted); False if its replica was draining
        (counted as a retry)."""
        final = self.result.final
        if final is not None and final.stop_reason not in (
            pb.STOP_REASON_UNSPECIFIED,
            pb.STOP_REASON_SHUTDOWN,
        ):
            return True
        self.result.retries += 1
        return False

    def time_left(self) -> float | None:
        """Seconds left of ``max_seconds`` (None: no limit): each call's deadline."""
        return None if self._stop_at is None else max(self._stop_at - time.monotonic(), 0.0)

    def out_of_time(self) -> bool:
        """True (and the result's ``timed_out`` set) once ``max_seconds`` have passed."""
        self.result.timed_out = self._stop_at is not None and time.monotonic() >= self._stop_at
        return self.result.timed_out

    def failed(self, error: RnnServeError) -> float | None:
        """A try failed with ``error``: seconds to wait before the next (``on_retry`` is told),
        or None once ``max_seconds`` have passed. Raises ``error`` if it is not worth
        retrying or the time for retries is up."""
        if self.out_of_time():
            return None
        delay = self._retries.delay(error)
        self.result.retries += 1
        if self._on_retry is not None:
            self._on_retry(error, delay)
        return delay
