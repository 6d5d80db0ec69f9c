"""One session: a Trainer, its loss history, its busy flag and the watchers of its loss.

Threading model: the event loop owns the session object; the Trainer and the loss history are
mutated only while ``lock`` is held: in worker threads (training chunks, single steps, appends),
or on the event loop for a single step known to take under ``QUICK_STEP_SECONDS`` when the lock
is free (``try_step_now``). They are read under the same lock for predictions, samples and
checkpoint snapshots. The busy flag, watcher count and change notifications are touched on the
event loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np

from rnnserve_server.engine.model_config import DivergedError, StepResult
from rnnserve_server.engine.trainer import Trainer
from rnnserve_server.errors import SessionBrokenError, SessionBusyError
from rnnserve_server.sessions.job_record import STOPPED, JobRecord
from rnnserve_server.sessions.loss_history import LossHistory
from rnnserve_server.sessions.session_types import (
    Broken,
    CheckpointState,
    ChunkResult,
    StopCause,
    Summary,
    TrainRun,
    Use,
)
from rnnserve_server.storage.checkpoint import Checkpoint

# A corpus step that took less than this last time runs on the event loop: the hop to a worker
# thread and back cost ~0.05-0.2 ms, a large share of a small model's Step (bench/service.py),
# and blocking the loop this long is no worse than the per-RPC work it already does.
QUICK_STEP_SECONDS = 0.002
# A session idle this long after its last Step/Train/AppendText frees its trainer's update
# scratch (Trainer.release_scratch: ~60 % of an idle hidden-100 trainer) and the unused tail of
# its loss history. Not after every call: re-allocating cost 4 % of a hidden-32 step and 33 % of
# a default-preset step (page faults on fresh buffers), too much for a Step loop.
SCRATCH_IDLE_SECONDS = 1.0
# The jobs a session keeps (each Train is one): the oldest ended go first, and a StartJob
# retried with the request_id of one gone makes a new job.
MAX_JOB_HISTORY = 100


class Session:
    """A named model with its training state. See the module docstring for threading rules.

    Its records are written by their owners: ``losses`` by the session itself, ``checkpoint``
    by the checkpoint writer, ``use`` by the registry and the use cases, ``broken`` by the
    factory and the registry; ``deleted`` by the registry (and the cluster) alone.
    """

    def __init__(
        self,
        session_id: str,
        *,
        create_time: float,
        update_time: float | None = None,
    ) -> None:
        self.id = session_id
        self.lock = threading.Lock()  # guards trainer and losses against worker threads
        self.trainer: Trainer | None = None
        self.losses = LossHistory()
        # Throughput of the newest Train (chars per second of that call so far); None until a
        # Train runs here. Kept in memory only: a restart or another replica starts unmeasured.
        self.chars_per_second: float | None = None
        self.create_time = create_time
        self.update_time = update_time if update_time is not None else create_time
        self.summary = Summary(None, "", 0, 0)
        self.broken: Broken | None = None
        self.checkpoint = CheckpointState()
        self.use = Use()
        self.deleted = False
        self.busy: str | None = None  # "Train", "Step" or "AppendText" while one runs
        self.cancel = threading.Event()
        self.stop_cause = StopCause.NONE
        self.closing = False  # watch streams end (delete, shutdown)
        self.load_lock = asyncio.Lock()
        # Its training jobs, oldest first (kept while evicted; in the checkpoint).
        self.jobs: list[JobRecord] = []
        self._stop_requested: asyncio.Event | None = None  # set by request_stop
        # AppendText and UpdateSession during a job hold it between two chunks.
        self._holds = 0
        self._released: asyncio.Event | None = None
        self.delete_lock = asyncio.Lock()  # one DeleteSession at a time
        # How long the last few single corpus steps took: their minimum is the step's cost
        # without the noise of a busy machine (one slow step must not leave the inline path).
        self._step_seconds: deque[float] = deque(maxlen=4)
        self._changed: asyncio.Event | None = None
        self._idle_since = 0.0  # monotonic time of the last end()
        self._scratch_timer: asyncio.TimerHandle | None = None  # pending _release_when_idle

    # ----- construction and checkpoints -------------------------------------------------

    @classmethod
    def new(cls, session_id: str, trainer: Trainer) -> Session:
        """A fresh session around a new Trainer (step 0, empty history)."""
        now = time.time()
        session = cls(session_id, create_time=now)
        session.trainer = trainer
        session._refresh_summary()
        return session

    @classmethod
    def unloadable(cls, session_id: str, broken: Broken, mtime: float) -> Session:
        """A placeholder for a checkpoint that could not be read."""
        session = cls(session_id, create_time=mtime)
        session.broken = broken
        session.checkpoint.dirty = False
        return session

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> Session:
        """A resident session restored from disk."""
        meta = ckpt.meta
        session = cls(
            ckpt.session_id,
            create_time=float(meta.get("create_time", 0.0)),
            update_time=float(meta.get("update_time", 0.0)),
        )
        session.attach(ckpt)
        session.jobs = [JobRecord.from_dict(job) for job in ckpt.jobs]
        for job in session.jobs:
            if job.active and job.attached:  # its caller's stream died with the server that ran it
                job.end(
                    STOPPED,
                    "caller_left",
                    session.step,
                    session.losses.loss,
                    session.losses.smoothed_loss,
                )
        best = ckpt.job_arrays.get("best_weights")
        if best is not None and session.jobs and session.jobs[-1].active:
            session.jobs[-1].best_weights = best
        return session

    def reconfigure(self, changes: dict[str, Any]) -> None:
        """Apply setting changes to the trainer (worker thread); see Trainer.reconfigure."""
        with self.lock:
            self.require_trainer().reconfigure(**changes)
            self._touch()

    def attach(self, ckpt: Checkpoint) -> None:
        """Load a checkpoint's trainer and history into this (evicted) session."""
        trainer = Trainer.from_state(ckpt.trainer_arrays, ckpt.trainer_meta)
        with self.lock:
            self.trainer = trainer
            self.losses.restore(ckpt.loss_history, ckpt.meta)
            self.checkpoint.step = self.losses.step
            self.checkpoint.corpus_on_disk = ckpt.corpus
            self.checkpoint.dirty = False
            self.broken = None
            self._refresh_summary()
        self.use.last_used = time.monotonic()

    def snapshot(self) -> Checkpoint | None:
        """A consistent copy of the state to write (worker thread); None when evicted.

        The corpus is copied only when it differs from ``checkpoint.corpus_on_disk`` (it only
        grows, so its length tells); otherwise the checkpoint refers to the corpus file on disk.
        """
        with self.lock:
            trainer = self.trainer
            if trainer is None:
                return None
            arrays, trainer_meta = trainer.state_dict(corpus=False)  # copies
            on_disk = self.checkpoint.corpus_on_disk
            if on_disk is None or on_disk.length != trainer.corpus_length:
                arrays["corpus"] = trainer.corpus.copy()
                on_disk = None
            meta = self._meta()
            history = self.losses.since(0, self.losses.step)
            jobs = [job.to_dict() for job in self.jobs]  # copies
            job = self.active_job
            job_arrays = {}
            if job is not None and job.best_weights is not None:
                job_arrays["best_weights"] = job.best_weights.copy()
        return Checkpoint(
            self.id, meta, arrays, trainer_meta, history, on_disk, jobs=jobs, job_arrays=job_arrays
        )

    def export_state(self) -> Checkpoint:
        """A consistent copy of everything, the corpus included (worker thread): what an
        archive or a fork holds."""
        with self.lock:
            trainer = self.require_trainer()
            arrays, trainer_meta = trainer.state_dict(corpus=True)  # copies
            meta = self._meta()
            history = self.losses.since(0, self.losses.step)
        return Checkpoint(self.id, meta, arrays, trainer_meta, history)

    def _meta(self) -> dict[str, Any]:
        """The checkpoint's session fields (under ``lock``)."""
        return {
            "create_time": self.create_time,
            "update_time": self.update_time,
            **self.losses.meta(),
        }

    def evict(self) -> bool:
        """Drop the Trainer and history from memory if nothing needs them; True if dropped."""
        if (
            self.trainer is None
            or self.busy
            or self.use.users
            or self.use.watchers
            or self.unsaved_changes
        ):
            return False
        with self.lock:
            self.trainer = None
            self.losses.drop()
        return True

    # ----- state ------------------------------------------------------------------------

    @property
    def resident(self) -> bool:
        """True when the Trainer is in memory."""
        return self.trainer is not None

    @property
    def active_job(self) -> JobRecord | None:
        """The queued or running job, if any (a session runs one at a time)."""
        job = self.jobs[-1] if self.jobs else None
        return job if job is not None and job.active else None

    @property
    def step(self) -> int:
        """Updates applied so far (also the length of the loss history)."""
        return self.losses.step

    @property
    def unsaved_changes(self) -> bool:
        """True while a change is not in a finished checkpoint yet."""
        return self.checkpoint.dirty or self.checkpoint.step != self.losses.step

    def require_trainer(self) -> Trainer:
        """The Trainer, or SessionBrokenError if the session could not be loaded."""
        if self.broken is not None:
            raise SessionBrokenError(
                f"session {self.id!r} could not be loaded: {self.broken.reason}; "
                "fix or remove the file, or delete the session",
                session_id=self.id,
                damaged=self.broken.damaged,
            )
        if self.trainer is None:  # pragma: no cover - the registry loads before use
            raise SessionBrokenError(f"session {self.id!r} is not loaded", session_id=self.id)
        return self.trainer

    def history(self, start: int, stop: int) -> np.ndarray:
        """Losses of steps start+1 .. stop (0-based slice of the history), a copy."""
        return self.losses.since(start, stop)

    def _refresh_summary(self) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        chars = int(trainer.corpus_length)
        corpus_bytes = self.summary.corpus_bytes
        if chars != self.summary.corpus_chars or self.summary.config is None:
            corpus_bytes = trainer.vocab.utf8_size(trainer.corpus)  # O(corpus): only on change
        self.summary = Summary(
            config=trainer.config,
            alphabet=trainer.vocab.alphabet,
            corpus_chars=chars,
            parameter_count=int(trainer.parameter_count),
            corpus_bytes=corpus_bytes,
            validation_chars=int(trainer.validation_length),
        )

    # ----- busy flag (event loop only) --------------------------------------------------

    def begin(self, kind: str, job: JobRecord | None = None) -> None:
        """Mark the session busy with ``kind``; SessionBusyError if something already runs.
        With ``job``, the session's job starts (or resumes): it becomes the active one."""
        self.require_trainer()
        active = self.active_job
        if active is not None and active is not job:
            raise SessionBusyError(
                f"session {self.id!r} is running training job sessions/{self.id}/jobs/"
                f"{active.job_id}; wait for it to end or stop it (StopJob), then retry",
                session_id=self.id,
            )
        if self.busy is not None:
            what = "training" if self.busy in ("Train", "Step") else f"running {self.busy}"
            raise SessionBusyError(
                f"session {self.id!r} is {what}; wait for it to finish or cancel it, then retry",
                session_id=self.id,
            )
        if job is not None and job not in self.jobs:
            self.jobs.append(job)
            ended = [j for j in self.jobs if not j.active]
            for old in ended[: max(0, len(ended) + 1 - MAX_JOB_HISTORY)]:
                self.jobs.remove(old)
            self.job_changed()
        self.busy = kind
        self.cancel.clear()
        self.stop_cause = StopCause.NONE
        self._stop_requested = None

    def job_changed(self) -> None:
        """A job record changed in a way the next checkpoint must keep (it began or ended)."""
        self.checkpoint.dirty = True

    def end(self) -> None:
        """Clear the busy flag; the trainer's scratch is freed SCRATCH_IDLE_SECONDS later
        unless the session is used again meanwhile."""
        self.busy = None
        self.use.last_used = self._idle_since = time.monotonic()
        if self._scratch_timer is None:  # one timer per session, re-armed while in use
            self._arm_scratch_timer(SCRATCH_IDLE_SECONDS)

    def _arm_scratch_timer(self, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a Session driven directly): nothing to schedule
            return
        self._scratch_timer = loop.call_later(delay, self._release_when_idle)

    def _release_when_idle(self) -> None:
        """Timer callback (event loop): free the trainer's update scratch and the history's
        unused capacity if the session has been idle SCRATCH_IDLE_SECONDS; else look again."""
        self._scratch_timer = None
        if self.trainer is None or self.deleted:
            return  # evicted or gone: nothing left to free
        wait = self._idle_since + SCRATCH_IDLE_SECONDS - time.monotonic()
        # Never block the event loop: a worker holding the lock means the session is in use.
        if wait > 0 or self.busy is not None or not self.lock.acquire(blocking=False):
            self._arm_scratch_timer(wait if wait > 0 else SCRATCH_IDLE_SECONDS)
            return
        try:
            self.trainer.release_scratch()
            self.losses.trim()
        finally:
            self.lock.release()

    def request_stop(self, cause: StopCause) -> None:
        """Ask a running Train to stop between two updates."""
        if self.stop_cause is StopCause.NONE:
            self.stop_cause = cause
        self.cancel.set()
        self.stop_requested().set()

    def stop_requested(self) -> asyncio.Event:
        """Set once a stop is requested (event loop): a queued job waits on it too."""
        if self._stop_requested is None:
            self._stop_requested = asyncio.Event()
            if self.cancel.is_set():
                self._stop_requested.set()
        return self._stop_requested

    @contextlib.asynccontextmanager
    async def between_chunks(self) -> AsyncIterator[None]:
        """Keep the session's job from starting another chunk while the block runs (it
        waits for the chunk in progress through ``lock``): AppendText and UpdateSession
        apply their change between two chunks, and nothing trains on it before it is kept."""
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if not self._holds and self._released is not None:
                self._released.set()
                self._released = None

    @property
    def held(self) -> bool:
        """True while a ``between_chunks`` block runs."""
        return self._holds > 0

    async def wait_between_chunks(self) -> None:
        """Until no ``between_chunks`` block holds the session (the job loop, event loop)."""
        while self._holds:
            if self._released is None:
                self._released = asyncio.Event()
            await self._released.wait()

    # ----- work done in worker threads --------------------------------------------------

    def train_chunk(
        self, max_steps: int, budget_s: float, run: TrainRun | None = None
    ) -> ChunkResult:
        """Run up to max_steps corpus updates for about budget_s seconds (worker thread).

        Checks the cancel flag before every update; a diverged update is not applied and
        ends the chunk with ``error`` set. With a ``run``, measures the validation loss on
        its schedule (and after the call's last update) and ends the chunk as soon as one of
        its stop conditions is met (``run.stop``).
        """
        steps = chars = 0
        last: StepResult | None = None
        deadline = time.perf_counter() + budget_s
        with self.lock:
            trainer = self.require_trainer()
            while steps < max_steps and not self.cancel.is_set():
                if run is not None and run.learning_rate is not None:
                    trainer.set_learning_rate(run.learning_rate(self.losses.step))
                try:
                    last = trainer.step()
                except DivergedError as exc:
                    self._touch()
                    return ChunkResult(steps, chars, last, exc)
                validation = None
                if run is not None:
                    run.done += 1
                    every = run.eval_every
                    if every and (run.done % every == 0 or run.done == run.steps):
                        validation = trainer.validation_loss()
                self.losses.record(last.loss, validation)
                steps += 1
                chars += last.chars
                if run is not None and self._run_says_stop(run, last.loss, validation):
                    break
                if time.perf_counter() >= deadline:
                    break
            if steps:
                self._touch()
        return ChunkResult(steps, chars, last)

    def _run_says_stop(self, run: TrainRun, loss: float, validation: float | None) -> bool:
        """Update the run's guard and early-stopping state; True once a stop condition holds."""
        run.window_min = min(run.window_min, loss)
        if validation is not None:
            job = run.job
            if run.best is None or validation < run.best:
                run.best, run.stale = validation, 0
                if job is not None:
                    job.best_step = self.losses.step
                    if run.restore_best:
                        job.best_weights = self.require_trainer().weights()
            else:
                run.stale += 1
                if run.patience and run.stale >= run.patience:
                    run.stop = "early"
            if job is not None:  # under the lock: a snapshot sees them with the weights
                job.validation_loss = validation
                job.best_validation_loss, job.stale = run.best, run.stale
        if run.until_loss is not None:
            if run.eval_every:  # with a validation split the target is the validation loss
                if validation is not None and validation <= run.until_loss:
                    run.stop = "target"
            elif self.losses.smoothed_loss <= run.until_loss:
                run.stop = "target"
        return run.stop is not None

    def after_job(self, best: np.ndarray | None) -> None:
        """After a job's last chunk (worker thread): its best weights put back (restore_best)
        and the learning rate the session's again (a schedule changed it)."""
        with self.lock:
            trainer = self.require_trainer()
            if best is not None:
                trainer.set_weights(best)
                self._touch()
            trainer.set_learning_rate(trainer.config.learning_rate)

    def step_once(self, ids: np.ndarray | None) -> StepResult:
        """One update on the corpus (ids None) or on ids from a zero state (worker thread)."""
        with self.lock:
            return self._step(ids)

    def try_step_now(self) -> StepResult | None:
        """One corpus update on the calling thread (the event loop) if recent ones took under
        QUICK_STEP_SECONDS and the lock is free; None otherwise (use step_once in a worker)."""
        if not self._step_seconds or min(self._step_seconds) >= QUICK_STEP_SECONDS:
            return None
        if not self.lock.acquire(blocking=False):
            return None
        try:
            return self._step(None)
        finally:
            self.lock.release()

    def _step(self, ids: np.ndarray | None) -> StepResult:
        """step_once's body; the caller holds ``lock``."""
        trainer = self.require_trainer()
        if ids is None:
            started = time.perf_counter()
            result = trainer.step()
            self._step_seconds.append(time.perf_counter() - started)
        else:
            result = trainer.step_on(ids)
        self.losses.record(result.loss)
        self._touch()
        return result

    def append(self, ids: np.ndarray) -> int:
        """Add encoded text to the corpus (worker thread); the corpus length before it."""
        with self.lock:
            trainer = self.require_trainer()
            before = int(trainer.corpus_length)
            trainer.append(ids)
            self._touch()
        return before

    def undo_append(self, length: int) -> None:
        """Cut the corpus back to ``length`` characters (worker thread): an AppendText that
        could not be saved. Only valid while the session stayed busy since the append, so no
        update has read the new text."""
        with self.lock:
            self.require_trainer().corpus_length = length
            self._touch()

    def with_trainer(self, fn: Callable[[Trainer], Any]) -> Any:
        """Call fn(trainer) under the lock (worker thread), for predictions and samples."""
        with self.lock:
            return fn(self.require_trainer())

    def next_chunk(self, it: Iterator[np.ndarray], count: int = 1) -> np.ndarray | None:
        """Up to ``count`` chunks of a sampling iterator, joined, under the lock (worker
        thread); None once it is exhausted."""
        with self.lock:
            chunks = []
            for chunk in it:
                chunks.append(chunk)
                if len(chunks) == count:
                    break
        if not chunks:
            return None
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def _touch(self) -> None:
        self.checkpoint.dirty = True
        self.update_time = time.time()
        self._refresh_summary()

    # ----- change notification (event loop only) ----------------------------------------

    def changed(self) -> asyncio.Event:
        """An event set at the next notify(); grab it before reading the state it guards."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def notify(self) -> None:
        """Wake every waiter on the current changed() event."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def close_watchers(self) -> None:
        """End every WatchLoss stream on this session."""
        self.closing = True
        self.notify()
