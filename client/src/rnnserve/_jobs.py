"""The sync client's training jobs: :class:`Job`, a handle on one job the server runs (see
docs/training-jobs.md), and :class:`JobStream`, its progress (re-exported by
:mod:`rnnserve.client` and :mod:`rnnserve`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import grpc

from rnnserve._retry import DEFAULT_RETRY_FOR
from rnnserve._rpc import RpcClient
from rnnserve._streams import ReconnectingStream
from rnnserve._watch import ENDED, JobWatch
from rnnserve.v1 import rnn_service_pb2 as pb

__all__ = ["ENDED", "Job", "JobStream"]


class JobStream(ReconnectingStream[pb.WatchJobResponse, pb.TrainResponse]):
    """A job's progress (WatchJob): TrainResponse messages as a Train streams them; ``job`` is
    the newest Job seen (ended once the stream ends). Cancelling detaches: the job goes on.

    Cut off before the job's end (its replica died or drained, a proxy reset the stream), it
    reconnects by itself (``reconnects`` counts it) and goes on after the last report it
    delivered; ``rollbacks`` lists the steps the job was back at when it had resumed from a
    checkpoint behind that report (the reports that follow repeat the steps after it)."""

    def __init__(
        self,
        start: Callable[[Any, float | None], grpc.CallIterator[pb.WatchJobResponse]],
        watch: JobWatch,
    ) -> None:
        super().__init__(start, watch)
        self._job_watch = watch

    @property
    def job(self) -> pb.Job:
        return self._job_watch.job


class Job:
    """A handle on one training job (``sessions/{session}/jobs/{job}``); ``info`` is the
    newest Job the handle has seen. The job runs on the server whatever the handle does."""

    def __init__(self, client: RpcClient, info: pb.Job) -> None:
        self._client = client
        self.info = info
        self.name = info.name

    def __repr__(self) -> str:
        return f"Job({self.name!r})"

    @property
    def ended(self) -> bool:
        """True once ``info`` shows the job SUCCEEDED, STOPPED or FAILED."""
        return self.info.state in ENDED

    def refresh(self, *, timeout: float | None = None) -> pb.Job:
        """The job now (GetJob)."""
        request = pb.GetJobRequest(name=self.name)
        self.info = self._client._unary(self._client._stub.GetJob, request, timeout).job
        return self.info

    def stop(self, *, timeout: float | None = None) -> pb.Job:
        """Stop the job between two updates; returns it once stopped and checkpointed. A job
        that already ended is returned unchanged."""
        request = pb.StopJobRequest(name=self.name)
        self.info = self._client._unary(self._client._stub.StopJob, request, timeout).job
        return self.info

    def follow(
        self, *, timeout: float | None = None, retry_for: float = DEFAULT_RETRY_FOR
    ) -> JobStream:
        """The job's progress until it ends (as ``Session.train`` streams it); leaving the
        loop early detaches, it does not stop the job. A watch cut off before the end
        reconnects by itself for up to ``retry_for`` seconds since its last message;
        ``timeout`` is the whole watch's deadline."""
        start = partial(self._client._server_stream, self._client._stub.WatchJob)
        return JobStream(start, JobWatch(self.info, retry_for, timeout))

    def wait(self, *, timeout: float | None = None, retry_for: float = DEFAULT_RETRY_FOR) -> pb.Job:
        """Until the job ends (reconnecting as :meth:`follow` does); the ended job."""
        stream = self.follow(timeout=timeout, retry_for=retry_for)
        for _ in stream:
            pass
        self.info = stream.job
        return self.info if self.ended else self.refresh()
