"""The sync client's :class:`Session`: a handle on one session (re-exported by
:mod:`rnnserve.client` and :mod:`rnnserve`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from rnnserve._common import generate_request
from rnnserve._jobs import Job
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
from rnnserve._rpc import RpcClient
from rnnserve._streams import Stream, TrainStream, WatchStream
from rnnserve._train_to import TrainToResult, TrainToRun
from rnnserve._watch import LossWatch
from rnnserve.errors import JobNotFound, RnnServeError
from rnnserve.v1 import rnn_service_pb2 as pb

__all__ = ["Session"]


class Session:
    """A handle on one session of a :class:`Client`; every method is one RPC.

    ``last_info`` holds the newest description of the session the handle has seen (from
    create, :meth:`info` or :meth:`append_text`), or ``None``.
    """

    def __init__(self, client: RpcClient, session_id: str, info: pb.Session | None = None) -> None:
        self._client = client
        self.id = session_id
        self.last_info = info

    def __repr__(self) -> str:
        return f"Session({self.id!r})"

    def info(self, *, timeout: float | None = None) -> pb.Session:
        """The session's configuration, state and progress."""
        request = pb.GetSessionRequest(session_id=self.id)
        self.last_info = self._client._unary(
            self._client._stub.GetSession, request, timeout
        ).session
        return self.last_info

    def delete(self, *, timeout: float | None = None) -> None:
        """Delete the session from the server's memory and disk."""
        request = pb.DeleteSessionRequest(session_id=self.id)
        self._client._unary(self._client._stub.DeleteSession, request, timeout)

    def step(
        self,
        text: str | None = None,
        *,
        until_step: int | None = None,
        retry_for: float = DEFAULT_RETRY_FOR,
        timeout: float | None = None,
    ) -> pb.StepResponse:
        """One optimizer update: on the corpus's next window, or on ``text`` from a zero state.

        ``until_step`` makes a retry safe: the update is applied only while the session is
        below that step (pass the step you last saw + 1). A retry whose first try was applied
        trains nothing and returns that try's step and loss with ``replayed`` set. With it, a
        call cut off (a replica lost, a connection reset, UNAVAILABLE) is retried for up to
        ``retry_for`` seconds; ``timeout`` is each try's."""
        request = pb.StepRequest(session_id=self.id, text=text or "", until_step=until_step)
        retries = Retries(retry_for) if until_step is not None else None
        while True:
            try:
                return self._client._unary(self._client._stub.Step, request, timeout)
            except RnnServeError as error:
                if retries is None:
                    raise
                time.sleep(retries.delay(error))

    def predict(self, text: str, *, timeout: float | None = None) -> pb.PredictResponse:
        """Most likely next character at each position of ``text``, and the loss on it."""
        request = pb.PredictRequest(session_id=self.id, text=text)
        return self._client._unary(self._client._stub.Predict, request, timeout)

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
        """Apply ``steps`` updates, streaming progress every ``report_every`` (0: ~1/s).

        Iterate the returned stream for the progress messages; the last one has
        ``stop_reason`` set. Stopping early (``break``, :meth:`TrainStream.cancel`) cancels
        the call and the server stops between two updates. ``stream.wait()`` runs to the end.

        ``until_step`` instead of ``steps`` trains until the session reaches that step: a
        retried call never trains past it (:meth:`train_to` retries for you).

        ``until_loss`` stops once the loss (the validation loss if the session has a
        validation split, else the smoothed loss) reaches it; ``patience`` stops after that
        many validation measurements without a new best (early stopping); ``eval_every``
        measures the validation loss every that many updates (0: at each report). A loss
        above 2 ln V for a whole report window stops with ``STOP_REASON_DIVERGED``.
        """
        request = train_request(self.id, locals())
        call = self._client._server_stream(self._client._stub.Train, request, timeout)
        return TrainStream(call, request)

    def start_training(
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
        response = self._client._unary(self._client._stub.StartJob, request, timeout)
        return Job(self._client, response.job)

    def jobs(self, *, timeout: float | None = None) -> list[Job]:
        """The session's training jobs, newest first (every page of ListJobs)."""
        jobs: list[Job] = []
        token = ""
        while True:
            request = pb.ListJobsRequest(session_id=self.id, page_token=token)
            page = self._client._unary(self._client._stub.ListJobs, request, timeout)
            jobs += [Job(self._client, job) for job in page.jobs]
            token = page.next_page_token
            if not token:
                return jobs

    def job(self, job: str = "", *, timeout: float | None = None) -> Job:
        """A handle on one job: its id or name, or "" for the session's running job (or the
        newest, if none runs)."""
        if not job:
            info = self.info(timeout=timeout)
            if info.HasField("job"):
                return Job(self._client, info.job)
            found = self.jobs(timeout=timeout)
            if not found:
                raise JobNotFound(f"session {self.id!r} has no training jobs")
            return found[0]
        name = job if "/" in job else f"sessions/{self.id}/jobs/{job}"
        request = pb.GetJobRequest(name=name)
        response = self._client._unary(self._client._stub.GetJob, request, timeout)
        return Job(self._client, response.job)

    def update(
        self,
        *,
        learning_rate: float | None = None,
        clip: float | None = None,
        reset_every: int | None = None,
        optimizer: str | int | None = None,
        timeout: float | None = None,
    ) -> pb.Session:
        """Change the given settings (UpdateSession with a field mask of just those). A new
        optimizer starts with fresh state. During a training job (or a Train) the change is applied
        between two chunks of updates; refused (SessionBusy) during a Step."""
        request = update_request(self.id, learning_rate, clip, reset_every, optimizer)
        self.last_info = self._client._unary(
            self._client._stub.UpdateSession, request, timeout
        ).session
        return self.last_info

    def fork(
        self,
        new_session_id: str,
        *,
        learning_rate: float | None = None,
        clip: float | None = None,
        reset_every: int | None = None,
        optimizer: str | int | None = None,
        timeout: float | None = None,
    ) -> Session:
        """A copy of this session (weights, optimizer state, corpus, history) under a new id,
        with the given settings changed."""
        request = fork_request(self.id, new_session_id, learning_rate, clip, reset_every, optimizer)
        response = self._client._unary(self._client._stub.ForkSession, request, timeout)
        return Session(self._client, response.session.session_id, response.session)

    def export_stream(
        self, *, weights_only: bool = False, timeout: float | None = None
    ) -> Stream[pb.ExportSessionResponse, bytes]:
        """The session's archive (see docs/client.md, "The archive"), in chunks;
        ``weights_only``: its config, alphabet and weights alone (docs/model-format.md)."""
        request = pb.ExportSessionRequest(session_id=self.id, weights_only=weights_only)
        call = self._client._server_stream(self._client._stub.ExportSession, request, timeout)
        return Stream(call, lambda response: (response.data,) if response.data else ())

    def export(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        weights_only: bool = False,
        timeout: float | None = None,
    ) -> bytes:
        """The session's archive as bytes; also written to ``path`` if given (atomically:
        a temporary file renamed into place once complete)."""
        data = b"".join(self.export_stream(weights_only=weights_only, timeout=timeout))
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
        """Every update's loss from ``from_step`` on, then live as anyone trains the session.

        The stream ends when the session is deleted; cancel it to stop watching earlier. A
        watch cut off (the server or a replica stopped or died, a proxy reset the stream)
        reconnects by itself from the step after the last point it delivered, for up to
        ``retry_for`` seconds since its last message; ``timeout`` is the whole watch's
        deadline. In a cluster, ``stream.rollbacks`` lists the steps the session was
        restored at after a replica failed.
        """
        start = partial(self._client._server_stream, self._client._stub.WatchLoss)
        return WatchStream(start, LossWatch(self.id, from_step, retry_for, timeout))

    def train_to(
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
        """Train until the session's step is ``target_step``, surviving a replica's death.

        Idempotent: each try is a Train with ``until_step=target_step``, so the server never
        trains past the target, however often the call is retried. A try cut off by anything
        but the server's answer to the request itself (UNAVAILABLE, a proxy's reset, a stream
        that ended without its final message, a replica that lost the session) is retried
        with backoff for up to ``retry_for`` seconds since the last progress; in a cluster the
        session is activated elsewhere from its last checkpoint. If that checkpoint is behind
        a step this call already saw, the steps in between were lost and are trained again:
        reported in ``rollbacks`` as ``(seen, restored)``. ``on_retry(error, delay)`` is told
        before each retry. ``max_seconds`` stops (cancels cleanly) after that long, with
        ``timed_out`` set. ``options`` are Train's (``sample_length``, ``until_loss``, ...).
        """
        run = TrainToRun(retry_for, max_seconds, on_progress, on_retry)
        while not run.out_of_time():
            try:
                run.started(self.info(timeout=run.time_left()).step)
                stream = self.train(
                    until_step=target_step,
                    report_every=report_every,
                    timeout=run.time_left(),
                    **options,
                )
                for message in stream:
                    run.progress(message)
                if run.done():
                    break
            except RnnServeError as error:
                delay = run.failed(error)
                if delay is None:
                    break
                time.sleep(delay)
        return run.result

    def loss_history(
        self, from_step: int = 1, *, timeout: float | None = None
    ) -> list[pb.LossPoint]:
        """Every update's loss from ``from_step`` up to the session's current step.

        A finite :meth:`watch_loss`: reads the history, stops when it reaches the step that
        GetSession reported at the start (later updates are left out).
        """
        until = self.info(timeout=timeout).step
        points: list[pb.LossPoint] = []
        if until < max(from_step, 1):
            return points
        with self.watch_loss(from_step, timeout=timeout) as stream:
            for point in stream:
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
        """Sample ``length`` characters after ``prime``, yielded in chunks as they are made.

        ``temperature`` 0 is greedy; ``top_k`` > 0 samples among the k likeliest characters;
        the same ``seed`` gives the same text.
        """
        request = generate_request(self.id, length, prime, temperature, top_k, seed)
        method = self._client._generate_method(seed is not None)
        call = self._client._server_stream(method, request, timeout)
        return Stream(call, lambda response: (response.text,) if response.text else ())

    def generate(
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
        return "".join(
            self.generate_stream(length, prime, temperature, top_k, seed, timeout=timeout)
        )

    def append_text(
        self,
        source: TextSource,
        chunk_chars: int = DEFAULT_CHUNK_CHARS,
        *,
        timeout: float | None = None,
    ) -> pb.AppendTextResponse:
        """Add text to the corpus, streamed in chunks of at most ``chunk_chars`` characters.

        ``source`` is a str, a file object (text or binary, read a chunk at a time) or an
        iterable of chunks; see :func:`iter_text_chunks`. An error reading the source cancels
        the call and is re-raised as itself.
        """
        upload = append_upload(self.id, source, chunk_chars)
        response = self._client._client_stream(
            self._client._stub.AppendText, upload, timeout, session_id=self.id
        )
        self.last_info = response.session
        return response
