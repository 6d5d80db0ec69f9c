"""The asyncio client's training jobs: :class:`Job` and :class:`JobStream`, as the sync
:class:`rnnserve.Job` (re-exported by :mod:`rnnserve.aio`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from rnnserve._aio_rpc import RpcClient
from rnnserve._aio_streams import ReconnectingStream
from rnnserve._retry import DEFAULT_RETRY_FOR
from rnnserve._watch import ENDED, JobWatch
from rnnserve.v1 import rnn_service_pb2 as pb

__all__ = ["Job", "JobStream"]


class JobStream(ReconnectingStream[pb.WatchJobResponse, pb.TrainResponse]):
    """A job's progress, reconnecting by itself; see :class:`rnnserve.JobStream`."""

    def __init__(self, start: Callable[[Any, float | None], Any], watch: JobWatch) -> None:
        super().__init__(start, watch)
        self._job_watch = watch

    @property
    def job(self) -> pb.Job:
        return self._job_watch.job


class Job:
    """A handle on one training job; see :class:`rnnserve.Job`."""

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

    async def refresh(self, *, timeout: float | None = None) -> pb.Job:
        """The job now (GetJob)."""
        request = pb.GetJobRequest(name=self.name)
        self.info = (await self._client._unary(self._client._stub.GetJob, request, timeout)).job
        return self.info

    async def stop(self, *, timeout: float | None = None) -> pb.Job:
        """Stop the job between two updates; returns it once stopped."""
        request = pb.StopJobRequest(name=self.name)
        self.info = (await self._client._unary(self._client._stub.StopJob, request, timeout)).job
        return self.info

    def follow(
        self, *, timeout: float | None = None, retry_for: float = DEFAULT_RETRY_FOR
    ) -> JobStream:
        """The job's progress until it ends; leaving early detaches; reconnects by itself."""
        start = partial(self._client._server_stream, self._client._stub.WatchJob)
        return JobStream(start, JobWatch(self.info, retry_for, timeout))

    async def wait(
        self, *, timeout: float | None = None, retry_for: float = DEFAULT_RETRY_FOR
    ) -> pb.Job:
        """Until the job ends; the ended job."""
        stream = self.follow(timeout=timeout, retry_for=retry_for)
        async for _ in stream:
            pass
        self.info = stream.job
        return self.info if self.ended else await self.refresh()
