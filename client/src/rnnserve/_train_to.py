"""Bookkeeping of ``Session.train_to`` shared by the sync and asyncio clients: what a Train
toward a target step saw, retried and lost across a cluster replica's death."""

from __future__ import annotations

import time

from rnnserve.v1 import rnn_service_pb2 as pb


class TrainToResult:
    """What ``Session.train_to`` did: the last Train message, the retries it needed and the
    rollbacks it saw (``(step seen, step restored at)``: steps trained again)."""

    def __init__(self) -> None:
        self.final: pb.TrainResponse | None = None
        self.retries = 0
        self.rollbacks: list[tuple[int, int]] = []
        self._seen = 0

    def seen(self, step: int) -> int:
        """Record the session's current ``step`` (a rollback if it is behind a step already
        seen) and return it."""
        if self._seen > step:
            self.rollbacks.append((self._seen, step))
        self._seen = max(self._seen, step)
        return step

    def progress(self, message: pb.TrainResponse) -> None:
        """Record one Train message."""
        self._seen = max(self._seen, message.step)
        self.final = message

    def finished(self) -> bool:
        """The last Train ended for a reason other than a replica shutting down (completed,
        diverged, stopped early, deleted): retrying would not change it."""
        final = self.final
        return final is not None and final.stop_reason not in (
            pb.STOP_REASON_UNSPECIFIED,
            pb.STOP_REASON_SHUTDOWN,
        )

    def retry(self, deadline: float | None, retry_for: float) -> float:
        """Count a retry; the deadline of this run of retries (the caller gives up past it)."""
        self.retries += 1
        return deadline if deadline is not None else time.monotonic() + retry_for
