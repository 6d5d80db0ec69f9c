"""Training jobs, and the one loop that runs them: chunks of updates off the event loop, taking
turns through the scheduler, with progress, stop conditions, the runaway guard, the learning-rate
schedule, restore_best, time budgets, periodic checkpoints and metrics; no transport here.

A job is recorded with its session (sessions/job_record.py) and checkpointed with it. A
streaming Train is an *attached* job: the same loop, stopped (CALLER_LEFT) when its caller
leaves. A detached job that the server's shutdown stops stays RUNNING in its record, and
``Jobs.resume_all`` runs it again when the server starts on the same data directory.

In cluster mode a :class:`JobBoard` (Redis) knows every session with a detached job, so
another replica can resume it (``Jobs.resume``) when its session moves there; a job *parked*
for a move (``Jobs.park``) stays RUNNING in its record, as at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np

from rnnserve_server import metrics
from rnnserve_server.errors import (
    InvalidArgumentError,
    JobNotFoundError,
    LeaseLostError,
    LimitExceededError,
)
from rnnserve_server.logs import get_logger
from rnnserve_server.sessions import job_record as states
from rnnserve_server.sessions.job_record import JobRecord
from rnnserve_server.sessions.registry import Registry
from rnnserve_server.sessions.session import Session
from rnnserve_server.sessions.session_types import ChunkResult, StopCause, TrainRun
from rnnserve_server.usecases.job_scheduler import JobScheduler, default_slots
from rnnserve_server.usecases.request_limits import RequestLimits
from rnnserve_server.usecases.training_plan import FittedPlan, TrainingPlan

log = get_logger("rnnserve.service")

CHUNK_SECONDS = 0.25  # training time per turn: scheduling and stop latency vs overhead
PROGRESS_LOG_SECONDS = 10.0  # training progress is logged at most this often per job
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}", re.ASCII)
JOB_NAME_RE = re.compile(r"sessions/([^/]+)/jobs/([^/]+)")
# Why a stop request ended a job: (stop reason, state).
_CAUSES = {
    StopCause.CANCELLED: ("caller_left", states.STOPPED),
    StopCause.STOPPED: ("stopped", states.STOPPED),
    StopCause.DELETED: ("deleted", states.STOPPED),
    StopCause.SHUTDOWN: ("shutdown", states.STOPPED),
    StopCause.LEASE_LOST: ("shutdown", states.STOPPED),  # cluster: another replica owns it
    StopCause.MOVED: ("shutdown", states.STOPPED),  # cluster: handed to another replica
}
_ENDED_AS = {
    "completed": states.SUCCEEDED,
    "target_loss": states.SUCCEEDED,
    "early_stopped": states.SUCCEEDED,
    "time_budget": states.SUCCEEDED,
    "time_limit": states.STOPPED,
    "diverged": states.FAILED,
    "failed": states.FAILED,
}


@dataclass
class TrainProgress:
    """One progress report; the last one has a stop_reason."""

    step: int
    steps_done: int
    loss: float
    smoothed_loss: float
    chars_per_second: float
    elapsed_seconds: float
    checkpointed_step: int
    validation_loss: float = 0.0
    validation_step: int = 0
    # completed|diverged|target_loss|early_stopped|deleted|shutdown|stopped|caller_left|
    # time_budget|time_limit|failed
    stop_reason: str | None = None
    sample: str | None = None
    job_name: str = ""


@dataclass(frozen=True)
class JobView:
    """A job as a reply shows it: its record, with the progress of its session if active."""

    name: str
    session_id: str
    record: JobRecord
    plan: TrainingPlan
    step: int
    steps_done: int
    loss: float
    smoothed_loss: float
    eta_seconds: float | None


def job_name(session_id: str, job_id: str) -> str:
    return f"sessions/{session_id}/jobs/{job_id}"


def parse_job_name(name: str) -> tuple[str, str]:
    """(session id, job id) of "sessions/{session}/jobs/{job}"; INVALID_ARGUMENT otherwise."""
    match = JOB_NAME_RE.fullmatch(name)
    if match is None:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise InvalidArgumentError(
            f"name {shown!r} is not a job name: use sessions/SESSION_ID/jobs/JOB_ID "
            "(StartJob, ListJobs and GetSession show them)",
            field="name",
        )
    return match.group(1), match.group(2)


def job_view(session: Session, record: JobRecord) -> JobView:
    """The job with its progress now."""
    active = record.active and session.resident
    step = session.step if active else record.end_step
    eta = None
    config = session.summary.config
    if active and record.chars_per_second > 0 and config is not None:
        per_step = config.batch_size * config.seq_length
        eta = max(0, record.target_step - step) * per_step / record.chars_per_second
    return JobView(
        name=job_name(session.id, record.job_id),
        session_id=session.id,
        record=record,
        plan=TrainingPlan.from_dict(record.spec),
        step=step,
        steps_done=max(0, step - record.start_step),
        loss=session.losses.loss if active else record.loss,
        smoothed_loss=session.losses.smoothed_loss if active else record.smoothed_loss,
        eta_seconds=eta,
    )


async def sample_text(
    registry: Registry,
    session: Session,
    length: int,
    prime: np.ndarray | None = None,
    temperature: float = 1.0,
) -> str:
    """``length`` characters sampled after ``prime``, off the event loop."""
    start = prime if prime is not None else np.zeros(0, np.int32)

    def sample(trainer: Any) -> str:
        ids = np.concatenate(list(trainer.sample(start, length, temperature=temperature)))
        return str(trainer.vocab.decode(ids))

    return cast(str, await registry.run(session.with_trainer, sample))


async def train_chunk(
    registry: Registry, session: Session, max_steps: int, run: TrainRun | None = None
) -> ChunkResult:
    """One executor call of training that survives the caller being cancelled.

    On cancellation the running chunk is told to stop, awaited (so the session is
    consistent before the busy flag clears), and the cancellation re-raised.
    """
    future = asyncio.get_running_loop().run_in_executor(
        registry.compute, session.train_chunk, max_steps, CHUNK_SECONDS, run
    )
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        session.request_stop(StopCause.CANCELLED)
        await asyncio.wait([future])
        session.notify()
        raise


class JobBoard(Protocol):
    """Cluster mode: the set of sessions with a detached job that is queued or running, from
    which another replica resumes a job whose owner is gone. StorageError if it can't be
    reached."""

    async def add(self, session_id: str) -> None: ...

    async def remove(self, session_id: str) -> None: ...


class RunningJob:
    """A job being run: its record, its loop's task and the followers of its progress."""

    def __init__(self, session: Session, record: JobRecord, plan: TrainingPlan) -> None:
        self.session = session
        self.record = record
        self.plan = plan
        # The checkpoint's step it resumed from after a failover took back later steps.
        self.restored_at: int | None = None
        self.task: asyncio.Task[None] | None = None
        self.followers: list[asyncio.Queue[TrainProgress | None]] = []
        self.error: BaseException | None = None  # why the loop failed (an attached caller's)
        self.ended = asyncio.Event()

    @property
    def name(self) -> str:
        return job_name(self.session.id, self.record.job_id)

    def follow(self) -> asyncio.Queue[TrainProgress | None]:
        """A queue of every progress report from now on; None after the last."""
        queue: asyncio.Queue[TrainProgress | None] = asyncio.Queue()
        if self.ended.is_set():
            queue.put_nowait(None)
        else:
            self.followers.append(queue)
        return queue

    def publish(self, message: TrainProgress | None) -> None:
        for queue in self.followers:
            queue.put_nowait(message)
        if message is None:
            self.followers.clear()


class Jobs:
    """The training jobs of one server: start, stop, look up, follow and resume them."""

    def __init__(self, registry: Registry, limits: RequestLimits) -> None:
        self.registry = registry
        self.limits = limits
        settings = registry.settings
        self.scheduler = JobScheduler(settings.max_running_jobs or default_slots())
        self.running: dict[tuple[str, str], RunningJob] = {}
        self.board: JobBoard | None = None  # cluster mode

    # ----- start ------------------------------------------------------------------------

    async def start(
        self,
        session_id: str,
        plan: TrainingPlan,
        *,
        request_id: str = "",
        started_by: str = "",
        attached: bool = False,
    ) -> tuple[Session, JobRecord, RunningJob | None]:
        """Check the plan, record a job on the session and start its loop. A retried
        ``request_id`` returns the job it made (and its runner if still running)."""
        plan.check(self.limits)
        if request_id and not REQUEST_ID_RE.fullmatch(request_id):
            raise InvalidArgumentError(
                "request_id must be 1 to 64 letters, digits, '-' or '_' (a UUID fits)",
                field="request_id",
            )
        async with self.registry.use(session_id) as session:
            for job in session.jobs if request_id else ():
                if job.request_id == request_id:  # a retry (AIP-155): the same job
                    return session, job, self.running.get((session.id, job.job_id))
            fitted = plan.fit(session, self.limits)
            self._check_token_cap(started_by)
            await self.registry.checkpoints.check_writable(session)
            # Fixed now, so however often the job resumes it never trains past it (a Step may
            # have run during the check above: until_step still holds).
            target = session.step + fitted.steps if plan.until_step is None else plan.until_step
            if not attached and self.board is not None:  # before the job can exist
                await self.board.add(session.id)
            now = time.time()
            record = JobRecord(
                job_id=secrets.token_hex(6),
                spec=plan.to_dict(),
                start_step=session.step,
                target_step=max(target, session.step),
                create_time=now,
                started_by=started_by,
                attached=attached,
                request_id=request_id,
            )
            session.begin("Train", record)
            if not attached:  # durable before acknowledged: a crash right after resumes it
                await self.registry.checkpoints.flush(session)
                failed = self.registry.checkpoints.unsaved.get(session.id)
                if failed is not None:
                    session.jobs.remove(record)
                    session.end()
                    raise type(failed)(str(failed))
            running = self._launch(session, record, plan, fitted)
        return session, record, running

    def _check_token_cap(self, started_by: str) -> None:
        cap = self.registry.settings.max_jobs_per_token
        if not cap or not started_by:
            return
        mine = sum(1 for j in self.running.values() if j.record.started_by == started_by)
        if mine >= cap:
            raise LimitExceededError(
                f"the token {started_by} has {mine} queued or running training jobs, the most "
                f"this server allows (max_jobs_per_token {cap}); stop one or wait for one to end",
                setting="max_jobs_per_token",
                limit=cap,
                value=mine + 1,
            )

    def _launch(
        self, session: Session, record: JobRecord, plan: TrainingPlan, fitted: FittedPlan
    ) -> RunningJob:
        job = RunningJob(session, record, plan)
        if self.scheduler.waiting or self.scheduler.running >= self.scheduler.slots:
            record.state = states.QUEUED
        else:
            record.state = states.RUNNING
        self.running[(session.id, record.job_id)] = job
        self._count()
        job.task = asyncio.create_task(self._run(job, fitted))
        log.info(
            "train_started",
            job=job.name,
            session_id=session.id,
            token=record.started_by,
            attached=record.attached,
            start_step=session.step,
            target_step=record.target_step,
            resumed=record.start_time > 0,
        )
        return job

    async def resume_all(self) -> int:
        """Run again every detached job a checkpoint left queued or running (server start);
        an attached job's caller is gone: it is recorded as stopped. The number resumed."""
        resumed = 0
        for session in list(self.registry.sessions.values()):
            resumed += await self.resume(session)
        return resumed

    async def resume(self, session: Session, restored_at: int | None = None) -> bool:
        """Run the session's queued or running job again (server start; cluster mode: the
        session was activated here). ``restored_at``: a failover took the steps after this
        one back. True if a job was resumed."""
        record = session.active_job
        if record is None or (session.id, record.job_id) in self.running:
            return False
        plan = TrainingPlan.from_dict(record.spec)
        try:
            async with self.registry.use(session.id) as loaded:
                fitted = plan.fit(loaded, self.limits)
                loaded.begin("Train", record)
                job = self._launch(loaded, record, plan, fitted)
                job.restored_at = restored_at
                return True
        except Exception as exc:  # the job can't go on here: say why, keep serving
            record.error = f"could not resume: {exc}"
            self._end_record(session, record, "failed", states.FAILED)
            log.error("job_resume_failed", job=job_name(session.id, record.job_id), error=str(exc))
            if session.resident:
                self.registry.checkpoints.request(session)
            if self.board is not None:
                with contextlib.suppress(Exception):
                    await self.board.remove(session.id)
        return False

    # ----- cluster mode: what a replica's share of the jobs is -------------------------------

    def free_slots(self) -> int:
        """Slots minus the jobs queued or running here (negative: more jobs than slots)."""
        return self.scheduler.slots - len(self.running)

    def detached(self) -> list[str]:
        """The ids of the sessions whose detached job runs (or queues) here."""
        return [s for (s, _), j in self.running.items() if not j.record.attached]

    def movable(self, count: int) -> list[str]:
        """Up to ``count`` sessions whose detached job waits for a slot here, newest first
        (the older keep their place)."""
        waiting = [
            j
            for j in self.running.values()
            if not j.record.attached and j.record.state == states.QUEUED
        ]
        waiting.sort(key=lambda j: j.record.create_time, reverse=True)
        return [j.session.id for j in waiting[: max(0, count)]]

    async def park(self, session_id: str) -> None:
        """Stop the session's job here between two updates, still RUNNING in its record and
        checkpointed, so another replica resumes it (a fairness move)."""
        for (sid, _), job in list(self.running.items()):
            if sid == session_id:
                job.session.request_stop(StopCause.MOVED)
                await job.ended.wait()

    # ----- the loop ---------------------------------------------------------------------

    async def _run(self, job: RunningJob, fitted: FittedPlan) -> None:
        """The job's loop, holding its session in memory (as a call does) until its last
        message is out: nothing evicts it meanwhile."""
        session = job.session
        session.use.users += 1
        try:
            await self._loop(job, fitted)
        finally:
            session.use.users -= 1
            session.use.last_used = time.monotonic()

    async def _loop(self, job: RunningJob, fitted: FittedPlan) -> None:
        """The one training loop: chunks in turns until the job ends."""
        registry, session, record, plan = self.registry, job.session, job.record, job.plan
        settings = registry.settings
        steps = max(0, record.target_step - session.step)
        run = TrainRun(
            steps=steps,
            eval_every=fitted.eval_every,
            until_loss=plan.until_loss,
            patience=plan.patience,
            best=record.best_validation_loss,
            stale=record.stale,
            job=record,
            restore_best=plan.restore_best,
        )
        schedule = plan.schedule()
        if schedule is not None:
            total = record.target_step - record.start_step
            first = record.start_step

            def rate(step: int) -> float:
                peak = session.require_trainer().config.learning_rate
                return schedule.rate(peak, step - first, total)

            run.learning_rate = rate
        every = plan.report_every
        start = last_report = last_log = last_ckpt = time.monotonic()
        done = chars = 0
        reason = "completed"
        bound = log.bind(session_id=session.id, job=job.name)

        async def sample() -> str:
            text = await sample_text(
                registry, session, plan.sample_length, fitted.sample_prime, plan.sample_temperature
            )
            return plan.sample_prime + text

        def progress(stop_reason: str | None = None) -> TrainProgress:
            elapsed = time.monotonic() - start
            return TrainProgress(
                step=session.step,
                steps_done=done,
                loss=session.losses.loss,
                smoothed_loss=session.losses.smoothed_loss,
                chars_per_second=chars / elapsed if elapsed > 0 else 0.0,
                elapsed_seconds=elapsed,
                stop_reason=stop_reason,
                checkpointed_step=max(session.checkpoint.step, 0),
                validation_loss=session.losses.validation_loss
                if session.losses.validation_step
                else 0.0,
                validation_step=session.losses.validation_step,
                job_name=job.name,
            )

        def runaway_window() -> bool:
            """The guard: every loss since the last report above the runaway line."""
            high = run.window_min > fitted.runaway
            run.window_min = math.inf
            return high

        try:
            while True:
                if session.cancel.is_set():
                    reason = _CAUSES.get(session.stop_cause, ("stopped", ""))[0]
                    break
                if done >= steps:
                    break
                if run.stop is not None:
                    reason = "target_loss" if run.stop == "target" else "early_stopped"
                    break
                if plan.max_seconds and record.seconds_used >= plan.max_seconds:
                    reason = "time_budget"
                    break
                if settings.max_job_seconds and record.seconds_used >= settings.max_job_seconds:
                    reason = "time_limit"
                    break
                await session.wait_between_chunks()
                if not await self._turn(session, record):
                    continue  # stopped while queued: the top of the loop says why
                if session.held:  # a change came while it queued: it goes first
                    self.scheduler.release()
                    continue
                began = time.monotonic()
                try:
                    if not record.start_time:
                        record.start_time = time.time()
                    limit = steps - done
                    if every:
                        limit = min(limit, every - done % every)
                    chunk = await train_chunk(registry, session, limit, run)
                finally:
                    self.scheduler.release()
                    record.seconds_used += time.monotonic() - began
                done += chunk.steps
                chars += chunk.chars
                record.chars_per_second = chars / max(time.monotonic() - start, 1e-9)
                session.chars_per_second = record.chars_per_second
                metrics.record_training(chunk.steps, chunk.chars, session.id)
                session.notify()
                if chunk.error is not None:  # not applied: ends as STOP_REASON_DIVERGED
                    bound.warning("train_diverged", step=session.step, error=str(chunk.error))
                    reason = "diverged"
                    record.error = str(chunk.error)
                    break
                unsaved = registry.checkpoints.unsaved.get(session.id)
                if unsaved is not None:  # don't train on what can't be kept
                    bound.warning("train_unsaved", step=session.step, error=str(unsaved))
                    raise type(unsaved)(str(unsaved))
                now = time.monotonic()
                if now - last_ckpt >= settings.checkpoint_interval:
                    registry.checkpoints.request(session)
                    last_ckpt = now
                if now - last_log >= PROGRESS_LOG_SECONDS:
                    bound.info(
                        "train_progress",
                        step=session.step,
                        done=done,
                        loss=round(session.losses.smoothed_loss, 4),
                    )
                    last_log = now
                due = (done % every == 0) if every else (now - last_report >= 1.0)
                if (due or done == steps) and chunk.steps and runaway_window():
                    reason = "diverged"
                    record.error = (
                        f"the loss stayed above {fitted.runaway:.3g} (twice an untrained "
                        "model's) for a whole report window"
                    )
                    bound.warning(
                        "train_runaway",
                        step=session.step,
                        loss=session.losses.loss,
                        limit=fitted.runaway,
                    )
                    break
                if due and done < steps and chunk.steps and run.stop is None:
                    message = progress()
                    if plan.sample_length:
                        message.sample = await sample()
                    last_report = now
                    job.publish(message)
        except Exception as exc:
            job.error = exc
            reason = "failed"
            record.error = str(exc) or type(exc).__name__
            bound.error("job_failed", step=session.step, error=record.error)
        finally:
            if reason == "diverged":
                metrics.record_divergence()
            keep = reason == "shutdown" and not record.attached  # resumed at the next start
            if not keep:
                state = _ENDED_AS.get(reason) or _CAUSES.get(session.stop_cause, ("", ""))[1]
                self._end_record(session, record, reason, state or states.STOPPED)
            await self._leave(session, record, restore=record.state == states.SUCCEEDED)
            if not keep and not record.attached and self.board is not None:
                try:
                    await self.board.remove(session.id)
                except Exception as exc:  # the claim loops drop an ended job's entry
                    bound.warning("job_board_remove_failed", error=str(exc))
            self.running.pop((session.id, record.job_id), None)
            self._count()
            log.info(
                "train_finished",
                job=job.name,
                session_id=session.id,
                token=record.started_by,
                state=record.state,
                stop_reason=reason,
                cause=session.stop_cause.value,
                step=session.step,
                target_step=record.target_step,
                done=done,
                seconds_used=round(record.seconds_used, 3),
            )
        if session.stop_cause is StopCause.LEASE_LOST and job.error is None:
            job.error = LeaseLostError.moved(session.id)  # what it trained here is not kept
        final = progress(reason)
        if plan.sample_length and not session.deleted and job.error is None:
            with contextlib.suppress(Exception):
                final.sample = await sample()
        job.publish(final)
        job.publish(None)
        job.ended.set()

    async def _turn(self, session: Session, record: JobRecord) -> bool:
        """Wait for a scheduler slot (QUEUED meanwhile); False if a stop came first."""
        if self.scheduler.try_acquire():
            record.state = states.RUNNING
            return True
        record.state = states.QUEUED
        self._count()
        queued = time.monotonic()
        acquire = asyncio.ensure_future(self.scheduler.acquire())
        stop = asyncio.ensure_future(session.stop_requested().wait())
        try:
            await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not acquire.done():
                acquire.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acquire
        metrics.JOB_QUEUE_WAIT.observe(time.monotonic() - queued)
        if acquire.cancelled() or acquire.exception() is not None:
            return False
        record.state = states.RUNNING
        self._count()
        return True

    def _end_record(self, session: Session, record: JobRecord, reason: str, state: str) -> None:
        if session.resident:
            record.end(
                state, reason, session.step, session.losses.loss, session.losses.smoothed_loss
            )
        else:
            record.end(state, reason, record.end_step, record.loss, record.smoothed_loss)
        session.job_changed()

    async def _leave(self, session: Session, record: JobRecord, restore: bool) -> None:
        """The session after its job's loop: the best weights put back (restore_best), the
        learning rate back at the session's, not busy, checkpointed."""
        best = record.best_weights if restore else None
        if not record.active:
            record.best_weights = None
        if session.resident and not session.deleted:
            try:
                await self.registry.run(session.after_job, best)
            except Exception as exc:  # pragma: no cover - the weights came from this model
                log.error("job_restore_failed", session_id=session.id, error=str(exc))
        session.end()
        session.notify()
        if not session.deleted:
            await self.registry.checkpoints.flush(session)

    def _count(self) -> None:
        queued = sum(1 for j in self.running.values() if j.record.state == states.QUEUED)
        metrics.record_jobs(queued, len(self.running) - queued)

    # ----- the calls --------------------------------------------------------------------

    def find(self, name: str) -> tuple[Session, JobRecord]:
        """The session and record a job name names; NOT_FOUND naming what is unknown."""
        session_id, job_id = parse_job_name(name)
        session = self.registry.get(session_id)
        for record in session.jobs:
            if record.job_id == job_id:
                return session, record
        raise JobNotFoundError(
            f"session {session_id!r} has no job {job_id!r}; ListJobs shows its jobs",
            session_id=session_id,
        )

    async def stop(self, name: str) -> tuple[Session, JobRecord]:
        """Stop the named job between two updates and wait until it is checkpointed; a job
        that ended is returned unchanged."""
        session, record = self.find(name)
        job = self.running.get((session.id, record.job_id))
        if job is not None and record.active:
            session.request_stop(StopCause.STOPPED)
            await job.ended.wait()
        return session, record

    async def follow(
        self, name: str
    ) -> AsyncGenerator[tuple[Session, JobRecord, TrainProgress | None], None]:
        """The job now, then its progress until it ends; the last item has the ended job."""
        session, record = self.find(name)
        job = self.running.get((session.id, record.job_id))
        if job is None:
            yield session, record, None
            return
        queue = job.follow()
        yield session, record, None  # where it is now, before its next progress report
        while True:
            message = await queue.get()
            if message is None:
                return
            yield session, record, message

    async def train(
        self, session_id: str, plan: TrainingPlan, started_by: str = ""
    ) -> AsyncGenerator[TrainProgress, None]:
        """A streaming Train: an attached job, its progress until it ends; the job stops
        (CALLER_LEFT) when the caller leaves."""
        session, _, job = await self.start(session_id, plan, started_by=started_by, attached=True)
        assert job is not None  # an attached job is never a retry
        queue = job.follow()
        try:
            while (message := await queue.get()) is not None:
                if job.error is not None:  # the caller gets the error, not a last message
                    break
                yield message
            if job.error is not None:
                raise _fresh(job.error)
        finally:
            if not job.ended.is_set():  # the caller left (cancelled, or the stream closed)
                session.request_stop(StopCause.CANCELLED)
                with contextlib.suppress(BaseException):
                    await asyncio.shield(job.ended.wait())

    async def close(self) -> None:
        """Wait for every job's loop (after the registry's shutdown asked them to stop)."""
        for job in list(self.running.values()):
            job.session.request_stop(StopCause.SHUTDOWN)
        tasks = [j.task for j in self.running.values() if j.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def _fresh(exc: BaseException) -> BaseException:
    """A new exception like ``exc`` (one raised object can't be raised in two places)."""
    try:
        return type(exc)(str(exc))
    except Exception:  # pragma: no cover - an exception type with another signature
        return exc


__all__ = [
    "CHUNK_SECONDS",
    "JobBoard",
    "JobView",
    "Jobs",
    "RunningJob",
    "TrainProgress",
    "job_name",
    "job_view",
    "parse_job_name",
    "sample_text",
    "train_chunk",
]
