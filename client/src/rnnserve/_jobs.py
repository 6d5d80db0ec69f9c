"""The sync client's training jobs: :class:`Job`, a handle on one job the server runs (see
docs/training-jobs.md), and :class:`JobStream`, its progress (re-exported by
:mod:`rnnserve.client` and :mod:`rnnserve`)."""

from __future__ import annotations

import grpc

from rnnserve._rpc import RpcClient
from rnnserve._streams import Stream
from rnnserve.v1 import rnn_service_pb2 as pb

__all__ = ["ENDED", "Job", "JobStream"]

# The states of a job that has ended.
ENDED = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_STOPPED, pb.JOB_STATE_FAILED})


class JobStream(Stream[pb.WatchJobResponse, pb.TrainResponse]):
    """A job's progress (WatchJob): TrainResponse messages as a Train streams them; ``job`` is
    the newest Job seen (ended once the stream ends). Cancelling detaches: the job goes on."""

    def __init__(self, call: grpc.CallIterator[pb.WatchJobResponse], job: pb.Job) -> None:
        super().__init__(call, lambda m: (m.progress,) if m.HasField("progress") else ())
        self.job = job

    def _observe(self, message: pb.WatchJobResponse) -> None:
        self.job = message.job


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

    def follow(self, *, timeout: float | None = None) -> JobStream:
        """The job's progress until it ends (as ``Session.train`` streams it); leaving the
        loop early detaches, it does not stop the job."""
        request = pb.WatchJobRequest(name=self.name)
        call = self._client._server_stream(self._client._stub.WatchJob, request, timeout)
        return JobStream(call, self.info)

    def wait(self, *, timeout: float | None = None) -> pb.Job:
        """Until the job ends; the ended job."""
        stream = self.follow(timeout=timeout)
        for _ in stream:
            pass
        self.info = stream.job
        return self.info if self.ended else self.refresh()
