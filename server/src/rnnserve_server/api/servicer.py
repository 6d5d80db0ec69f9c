"""The RnnService servicer: the gRPC edge, and the one place errors become codes.

Each handler converts the request (converters.py), calls the use case (usecases/,
which knows nothing of gRPC), and converts the result back. Every domain exception is mapped
to a code and a google.rpc.Status with details in ``status.py``; anything unexpected is logged
and becomes INTERNAL, never UNKNOWN.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import structlog
from grpc import aio
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

from rnnserve_server.api import converters as cv
from rnnserve_server.api import interceptors, status
from rnnserve_server.api.converters import session_to_pb
from rnnserve_server.api.paging import page_token_after, read_page_request
from rnnserve_server.config import Settings
from rnnserve_server.logs import get_logger
from rnnserve_server.sessions.registry import Registry
from rnnserve_server.usecases.session_service import SessionService
from rnnserve_server.usecases.training import job_view

__all__ = ["Servicer", "session_to_pb"]

log = get_logger("rnnserve.service")

R = TypeVar("R")
Context = aio.ServicerContext[Any, Any]


def unary(
    fn: Callable[[Servicer, Any, aio.ServicerContext[Any, Any]], Awaitable[R]],
) -> Callable[[Servicer, Any, aio.ServicerContext[Any, Any]], Awaitable[R]]:
    """Map exceptions of a unary handler to status codes."""

    @functools.wraps(fn)
    async def wrapper(self: Servicer, request: Any, context: aio.ServicerContext[Any, Any]) -> R:
        _bind(request)
        try:
            return await fn(self, request, context)
        except aio.AbortError:
            raise
        except Exception as exc:
            await status.abort(context, exc)

    return wrapper


def stream(
    fn: Callable[[Servicer, Any, aio.ServicerContext[Any, Any]], AsyncIterator[R]],
) -> Callable[[Servicer, Any, aio.ServicerContext[Any, Any]], AsyncIterator[R]]:
    """Map exceptions of a server-streaming handler to status codes."""

    @functools.wraps(fn)
    async def wrapper(
        self: Servicer, request: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[R]:
        _bind(request)
        try:
            async for item in fn(self, request, context):
                yield item
        except aio.AbortError:
            raise
        except Exception as exc:
            await status.abort(context, exc)

    return wrapper


def _bind(request: Any) -> None:
    session_id = getattr(request, "session_id", None)
    if session_id:
        structlog.contextvars.bind_contextvars(session_id=session_id[:80])


class Servicer(pb_grpc.RnnServiceServicer):
    """rnnserve.v1.RnnService over a SessionService: convert, call, convert."""

    def __init__(
        self, settings: Settings, registry: Registry, service: SessionService | None = None
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.sessions = service if service is not None else SessionService(settings, registry)
        self.jobs = self.sessions.jobs

    # ----- sessions ---------------------------------------------------------------------

    @unary
    async def CreateSession(  # noqa: N802
        self, request: pb.CreateSessionRequest, context: Context
    ) -> pb.CreateSessionResponse:
        """Validate the config, then create and persist the session."""
        self.sessions.check_serving()
        config = cv.config_from_create(request)
        session = await self.sessions.create(
            request.session_id, config, request.text, request.alphabet
        )
        return pb.CreateSessionResponse(session=session_to_pb(session))

    @unary
    async def GetSession(  # noqa: N802
        self, request: pb.GetSessionRequest, context: Context
    ) -> pb.GetSessionResponse:
        """One session's state; works for evicted and broken sessions too."""
        return pb.GetSessionResponse(session=session_to_pb(self.sessions.get(request.session_id)))

    @unary
    async def ListSessions(  # noqa: N802
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        """One page of sessions ordered by id (as many as fit in one message)."""
        self.sessions.check_serving()
        size, after = read_page_request(request.page_size, request.page_token)
        sessions, next_after, total = self.sessions.list(size, after)
        token = page_token_after(next_after) if next_after else ""
        items, token = cv.fit_page(sessions, token, self.settings.max_message_bytes)
        return pb.ListSessionsResponse(sessions=items, next_page_token=token, total_size=total)

    @unary
    async def DeleteSession(  # noqa: N802
        self, request: pb.DeleteSessionRequest, context: Context
    ) -> pb.DeleteSessionResponse:
        """Remove the session; a running Train ends with stop_reason DELETED."""
        await self.sessions.delete(request.session_id)
        return pb.DeleteSessionResponse()

    @unary
    async def AppendText(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.AppendTextRequest], context: Context
    ) -> pb.AppendTextResponse:
        """Collect every chunk, then append them all at once (all or nothing)."""
        session, received = await self.sessions.append(cv.append_chunks(request_iterator))
        return pb.AppendTextResponse(session=session_to_pb(session), appended_chars=received)

    # ----- settings, export, import, fork -------------------------------------------------

    @unary
    async def UpdateSession(  # noqa: N802
        self, request: pb.UpdateSessionRequest, context: Context
    ) -> pb.UpdateSessionResponse:
        """AIP-134: change the masked settings; persisted before the reply."""
        changes = cv.update_changes(request)
        session = await self.sessions.update(request.session.session_id, changes)
        return pb.UpdateSessionResponse(session=session_to_pb(session))

    @unary
    async def ForkSession(  # noqa: N802
        self, request: pb.ForkSessionRequest, context: Context
    ) -> pb.ForkSessionResponse:
        """Copy a session (a consistent snapshot, even while it trains) under a new id."""
        changes = cv.fork_changes(request.config)
        copy = await self.sessions.fork(request.session_id, request.new_session_id, changes)
        return pb.ForkSessionResponse(session=session_to_pb(copy))

    @stream
    async def ExportSession(  # noqa: N802
        self, request: pb.ExportSessionRequest, context: Context
    ) -> AsyncIterator[pb.ExportSessionResponse]:
        """The session's archive, whole or weights only (storage/archive.py documents the
        format), in chunks."""
        data = await self.sessions.export(request.session_id, request.weights_only)
        for message in cv.export_messages(data, self.settings.max_message_bytes):
            yield message

    @unary
    async def ImportSession(  # noqa: N802
        self, request_iterator: AsyncIterator[pb.ImportSessionRequest], context: Context
    ) -> pb.ImportSessionResponse:
        """Collect the archive (bounded by max_import_bytes), check it, adopt it."""
        chunks = ((c.session_id, c.data) async for c in request_iterator)
        session = await self.sessions.import_(chunks)
        return pb.ImportSessionResponse(session=session_to_pb(session))

    # ----- training ---------------------------------------------------------------------

    @unary
    async def Step(  # noqa: N802
        self, request: pb.StepRequest, context: Context
    ) -> pb.StepResponse:
        """One update on the corpus or on the request's text."""
        return cv.step_to_pb(
            await self.sessions.step(
                request.session_id,
                request.text,
                request.until_step if request.HasField("until_step") else None,
            )
        )

    @stream
    async def Train(  # noqa: N802
        self, request: pb.TrainRequest, context: Context
    ) -> AsyncIterator[pb.TrainResponse]:
        """Run request.steps updates, streaming progress."""
        progress = self.sessions.train(
            request.session_id, cv.training_plan(request), interceptors.CALLER.get()
        )
        async with contextlib.aclosing(progress):  # a cancelled call stops the training
            async for p in progress:
                yield cv.progress_to_pb(p)

    @stream
    async def WatchLoss(  # noqa: N802
        self, request: pb.WatchLossRequest, context: Context
    ) -> AsyncIterator[pb.WatchLossResponse]:
        """History from from_step, then live points, until delete or shutdown."""
        batches = self.sessions.watch(request.session_id, int(request.from_step))
        async with contextlib.aclosing(batches):
            async for points in batches:
                yield cv.loss_points(points)

    # ----- sampling ---------------------------------------------------------------------

    @stream
    async def Generate(  # noqa: N802
        self, request: pb.GenerateRequest, context: Context
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Sample request.length characters after the prime, in chunks."""
        texts = self.sessions.generate(request.session_id, cv.generate_options(request))
        async with contextlib.aclosing(texts):
            async for text in texts:
                yield pb.GenerateResponse(text=text)

    @unary
    async def Predict(  # noqa: N802
        self, request: pb.PredictRequest, context: Context
    ) -> pb.PredictResponse:
        """Argmax next characters from a zero state, and the loss against wrap-around targets."""
        text, loss = await self.sessions.predict(request.session_id, request.text)
        return pb.PredictResponse(predicted=text, loss=loss, bits_per_char=loss / cv.LN2)

    # ----- training jobs ----------------------------------------------------------------

    @unary
    async def StartJob(  # noqa: N802
        self, request: pb.StartJobRequest, context: Context
    ) -> pb.StartJobResponse:
        """Check the spec, record the job with its session (durably), answer at once."""
        self.sessions.check_serving()
        session, record, _ = await self.jobs.start(
            request.session_id,
            cv.job_plan(request.spec),
            request_id=request.request_id,
            started_by=interceptors.CALLER.get(),
        )
        return pb.StartJobResponse(job=cv.job_to_pb(job_view(session, record)))

    @unary
    async def GetJob(  # noqa: N802
        self, request: pb.GetJobRequest, context: Context
    ) -> pb.GetJobResponse:
        """One job by name."""
        self.sessions.check_serving()
        session, record = self.jobs.find(request.name)
        return pb.GetJobResponse(job=cv.job_to_pb(job_view(session, record)))

    @unary
    async def ListJobs(  # noqa: N802
        self, request: pb.ListJobsRequest, context: Context
    ) -> pb.ListJobsResponse:
        """A session's jobs, newest first, one page at a time."""
        self.sessions.check_serving()
        size, after = read_page_request(request.page_size, request.page_token)
        session = self.sessions.get(request.session_id)
        newest = list(reversed(session.jobs))
        ids = [j.job_id for j in newest]
        first = ids.index(after) + 1 if after in ids else 0
        if after and after not in ids:
            first = len(ids)  # that job is gone (its session was replaced): nothing after it
        page = newest[first : first + size]
        token = page_token_after(page[-1].job_id) if first + size < len(newest) else ""
        return pb.ListJobsResponse(
            jobs=[cv.job_to_pb(job_view(session, r)) for r in page], next_page_token=token
        )

    @unary
    async def StopJob(  # noqa: N802
        self, request: pb.StopJobRequest, context: Context
    ) -> pb.StopJobResponse:
        """Stop the job between two updates; returns it once stopped and checkpointed."""
        session, record = await self.jobs.stop(request.name)
        return pb.StopJobResponse(job=cv.job_to_pb(job_view(session, record)))

    @stream
    async def WatchJob(  # noqa: N802
        self, request: pb.WatchJobRequest, context: Context
    ) -> AsyncIterator[pb.WatchJobResponse]:
        """The job's progress until it ends; cancelling detaches."""
        self.sessions.check_serving()
        updates = self.jobs.follow(request.name)
        async with contextlib.aclosing(updates):
            async for session, record, progress in updates:
                message = pb.WatchJobResponse(job=cv.job_to_pb(job_view(session, record)))
                if progress is not None:
                    message.progress.CopyFrom(cv.progress_to_pb(progress))
                else:  # the first message: where a failover's move resumed it, if it did
                    running = self.jobs.running.get((session.id, record.job_id))
                    if running is not None and running.restored_at is not None:
                        message.restored_at_step = running.restored_at
                yield message
