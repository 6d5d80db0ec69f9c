"""The asyncio client's :class:`Session` (re-exported by :mod:`rnnserve.aio`)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from functools import partial
from typing import Any

from rnnserve._aio_jobs import Job
from rnnserve._aio_rpc import RpcClient
from rnnserve._aio_streams import Stream, TrainStream, WatchStream
from rnnserve._common import generate_request
from rnnserve._requests import (
    DEFAULT_CHUNK_CHARS,
    TextSource,
    append_upload,
    fork_request,
    start_job_request,
    train_request,
    update_request,
    write_file,
)
from rnnserve._retry import DEFAULT_RETRY_FOR, Retries
from rnnserve._train_to import TrainToResult, TrainToRun
from rnnserve._watch import LossWatch
from rnnserve.errors import JobNotFound, RnnServeError
from rnnserve.v1 import rnn_service_pb2 as pb

__all__ = ["Session"]


class Session:
    """A handle on one session of an asyncio :class:`Client`; every method is one RPC."""

    def __init__(self, client: RpcClient, session_id: str, info: pb.Session | None = None) -> None:
        self._client = client
        self.id = session_id
        self.last_info = info

    def __repr__(self) -> str:
        return f"aio.Session({self.id!r})"

    async def info(self, *, timeout: float | None = None) -> pb.Session:
        """The session's configuration, state and progress."""
        request = pb.GetSessionRequest(session_id=self.id)
        response = await self._client._unary(self._client._stub.GetSession, request, timeout)
        self.last_info = response.session
        return response.session  # type: ignore[no-any-return]

    async def delete(self, *, timeout: float | None = None) -> None:
        """Delete the session from the server's memory and disk."""
        request = pb.DeleteSessionRequest(session_id=self.id)
        await self._client._unary(self._client._stub.DeleteSession, request, timeout)

    async def step(
        self,
        text: str | None = None,
        *,
        until_step: int | None = None,
        retry_for: float = DEFAULT_RETRY_FOR,
        timeout: float | None = None,
    ) -> pb.StepResponse:
        """One optimizer update; see :meth:`rnnserve.Session.step` (with ``until_step``, a
        call cut off is retried for up to ``retry_for`` seconds)."""
        request = pb.StepRequest(session_id=self.id, text=text or "", until_step=until_step)
        retries = Retries(retry_for) if until_step is not None else None
        while True:
            try:
                return await self._client._unary(self._client._stub.Step, request, timeout)  # type: ignore[no-any-return]
            except RnnServeError as error:
                if retries is None:
                    raise
                await asyncio.sleep(retries.delay(error))

    async def predict(self, text: str, *, timeout: float | None = None) -> pb.PredictResponse:
        """Most likely next character at each position of ``text``, and the loss on it."""
        request = pb.PredictRequest(session_id=self.id, text=text)
        return await self._client._unary(self._client._stub.Predict, request, timeout)  # type: ignore[no-any-return]

    def train(
        self,
        steps: int = 0,
        report_every: int = 0,
        sample_length: int = 0,
        *,
        until_step: int | None = None,
        until_loss: float | None = None,
        patience: int = 0,
        eval_every: int = 0,
        sample_temperature: float | None = None,
        sample_prime: str = "",
        timeout: float | None = None,
    ) -> TrainStream:
        """Apply ``steps`` updates, streaming progress; see :meth:`rnnserve.Session.train`."""
        request = train_request(self.id, locals())
        call = self._client._server_stream(self._client._stub.Train, request, timeout)
        return TrainStream(call, request)

    async def start_training(
        self,
        steps: int = 0,
        report_every: int = 0,
        sample_length: int = 0,
        *,
        until_step: int | None = None,
        until_loss: float | None = None,
        patience: int = 0,
        eval_every: int = 0,
        sample_temperature: float | None = None,
        sample_prime: str = "",
        max_seconds: float = 0.0,
        warmup_steps: int = 0,
        decay: str = "",
        min_learning_rate: float | None = None,
        restore_best: bool = False,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Job:
        """Start a training job the server owns (StartJob) and return its handle at once.

        It takes what :meth:`train` takes, plus ``max_seconds`` (a training-time budget across
        restarts), a learning-rate schedule (``warmup_steps``, ``decay`` "cosine" or
        "linear" to ``min_learning_rate``) and ``restore_best`` (end at the weights of the
        best validation loss). It runs with no client connected and resumes after a server
        restart; ``job.follow()`` streams its progress, ``job.wait()`` waits for its end,
        ``job.stop()`` stops it. ``request_id`` (a new UUID if not given) makes a retry of
        this call return the same job."""
        request = start_job_request(self.id, locals(), request_id)
        response = await self._client._unary(self._client._stub.StartJob, request, timeout)
        return Job(self._client, response.job)

    async def jobs(self, *, timeout: float | None = None) -> list[Job]:
        """The session's training jobs, newest first (every page of ListJobs)."""
        jobs: list[Job] = []
        token = ""
        while True:
            request = pb.ListJobsRequest(session_id=self.id, page_token=token)
            page = await self._client._unary(self._client._stub.ListJobs, request, timeout)
            jobs += [Job(self._client, job) for job in page.jobs]
            token = page.next_page_token
            if not token:
                return jobs

    async def job(self, job: str = "", *, timeout: float | None = None) -> Job:
        """A handle on one job: its id or name, or "" for the session's running job (or the
        newest, if none runs)."""
        if not job:
            info = await self.info(timeout=timeout)
            if info.HasField("job"):
                return Job(self._client, info.job)
            found = await self.jobs(timeout=timeout)
            if not found:
                raise JobNotFound(f"session {self.id!r} has no training jobs")
            return found[0]
        name = job if "/" in job else f"sessions/{self.id}/jobs/{job}"
        request = pb.GetJobRequest(name=name)
        response = await self._client._unary(self._client._stub.GetJob, request, timeout)
        return Job(self._client, response.job)

    async def update(
        self,
        *,
        learning_rate: float | None = None,
        clip: float | None = None,
        reset_every: int | None = None,
        optimizer: str | int | None = None,
        timeout: float | None = None,
    ) -> pb.Session:
        """Change the given settings; see :meth:`rnnserve.Session.update`."""
        request = update_request(self.id, learning_rate, clip, reset_every, optimizer)
        response = await self._client._unary(self._client._stub.UpdateSession, request, timeout)
        self.last_info = response.session
        return response.session  # type: ignore[no-any-return]

    async def fork(
        self,
        new_session_id: str,
        *,
        learning_rate: float | None = None,
        clip: float | None = None,
        reset_every: int | None = None,
        optimizer: str | int | None = None,
        timeout: float | None = None,
    ) -> Session:
        """A copy of this session under a new id; see :meth:`rnnserve.Session.fork`."""
        request = fork_request(self.id, new_session_id, learning_rate, clip, reset_every, optimizer)
        response = await self._client._unary(self._client._stub.ForkSession, request, timeout)
        return Session(self._client, response.session.session_id, response.session)

    def export_stream(
        self, *, weights_only: bool = False, timeout: float | None = None
    ) -> Stream[pb.ExportSessionResponse, bytes]:
        """The session's archive (see docs/client.md, "The archive"), in chunks;
        ``weights_only``: its config, alphabet and weights alone (docs/model-format.md)."""
        request = pb.ExportSessionRequest(session_id=self.id, weights_only=weights_only)
        call = self._client._server_stream(self._client._stub.ExportSession, request, timeout)
        return Stream(call, lambda response: (response.data,) if response.data else ())

    async def export(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        weights_only: bool = False,
        timeout: float | None = None,
    ) -> bytes:
        """The session's archive as bytes; also written to ``path`` if given (atomically)."""
        data = b"".join(
            [
                chunk
                async for chunk in self.export_stream(weights_only=weights_only, timeout=timeout)
            ]
        )
        if path is not None:
            write_file(path, data)
        return data

    def watch_loss(
        self,
        from_step: int = 1,
        *,
        timeout: float | None = None,
        retry_for: float = DEFAULT_RETRY_FOR,
    ) -> WatchStream:
        """Every update's loss from ``from_step`` on, then live; cancel it to stop watching.
        ``stream.rollbacks`` lists a cluster's announced restores. A watch cut off
        reconnects by itself from the step after its last point, for up to ``retry_for``
        seconds since its last message; ``timeout`` is the whole watch's deadline."""
        start = partial(self._client._server_stream, self._client._stub.WatchLoss)
        return WatchStream(start, LossWatch(self.id, from_step, retry_for, timeout))

    async def train_to(
        self,
        target_step: int,
        *,
        report_every: int = 0,
        retry_for: float = DEFAULT_RETRY_FOR,
        max_seconds: float | None = None,
        on_progress: Callable[[pb.TrainResponse], None] | None = None,
        on_retry: Callable[[RnnServeError, float], None] | None = None,
        **options: Any,
    ) -> TrainToResult:
        """Train until the session's step is ``target_step``, surviving a replica's death;
        see :meth:`rnnserve.Session.train_to`."""
        run = TrainToRun(retry_for, max_seconds, on_progress, on_retry)
        while not run.out_of_time():
            try:
                run.started((await self.info(timeout=run.time_left())).step)
                stream = self.train(
                    until_step=target_step,
                    report_every=report_every,
                    timeout=run.time_left(),
                    **options,
                )
                async for message in stream:
                    run.progress(message)
                if run.done():
                    break
            except RnnServeError as error:
                delay = run.failed(error)
                if delay is None:
                    break
                await asyncio.sleep(delay)
        return run.result

    async def loss_history(
        self, from_step: int = 1, *, timeout: float | None = None
    ) -> list[pb.LossPoint]:
        """Every update's loss from ``from_step`` up to the session's current step; see
        :meth:`rnnserve.Session.loss_history`."""
        until = (await self.info(timeout=timeout)).step
        points: list[pb.LossPoint] = []
        if until < max(from_step, 1):
            return points
        async with self.watch_loss(from_step, timeout=timeout) as stream:
            async for point in stream:
                points.append(point)
                if point.step >= until:
                    break
        return points

    def generate_stream(
        self,
        length: int,
        prime: str = "",
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        *,
        timeout: float | None = None,
    ) -> Stream[pb.GenerateResponse, str]:
        """Sample ``length`` characters after ``prime``, in chunks as they are made."""
        request = generate_request(self.id, length, prime, temperature, top_k, seed)
        method = self._client._generate_method(seed is not None)
        call = self._client._server_stream(method, request, timeout)
        return Stream(call, lambda response: (response.text,) if response.text else ())

    async def generate(
        self,
        length: int,
        prime: str = "",
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        *,
        timeout: float | None = None,
    ) -> str:
        """:meth:`generate_stream`, joined into one string."""
        stream = self.generate_stream(length, prime, temperature, top_k, seed, timeout=timeout)
        return "".join([chunk async for chunk in stream])

    async def append_text(
        self,
        source: TextSource,
        chunk_chars: int = DEFAULT_CHUNK_CHARS,
        *,
        timeout: float | None = None,
    ) -> pb.AppendTextResponse:
        """Add text to the corpus in chunks; see :meth:`rnnserve.Session.append_text`. A file
        source is read in the event loop's thread, a chunk at a time."""
        upload = append_upload(self.id, source, chunk_chars)
        response: pb.AppendTextResponse = await self._client._client_stream(
            self._client._stub.AppendText, upload, timeout, session_id=self.id
        )
        self.last_info = response.session
        return response
