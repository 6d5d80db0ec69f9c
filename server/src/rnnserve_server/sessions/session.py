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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from rnnserve_server.engine.trainer import DivergedError, StepResult, Trainer
from rnnserve_server.errors import SessionBrokenError, SessionBusyError
from rnnserve_server.sessions.session_state import SessionState
from rnnserve_server.sessions.session_types import ChunkResult, StopCause, Summary, TrainPlan
from rnnserve_server.storage.checkpoint import Checkpoint, CorpusRef

__all__ = ["ChunkResult", "Session", "StopCause", "Summary", "TrainPlan"]

# Weight of the newest loss in the exponential moving average reported as smoothed_loss.
SMOOTHING = 0.02
# A corpus step that took less than this last time runs on the event loop: the hop to a worker
# thread and back cost ~0.05-0.2 ms, a large share of a small model's Step (bench/service.py),
# and blocking the loop this long is no worse than the per-RPC work it already does.
QUICK_STEP_SECONDS = 0.002
# A session idle this long after its last Step/Train/AppendText frees its trainer's update
# scratch (Trainer.release_scratch: ~60 % of an idle hidden-100 trainer) and the unused tail of
# its loss history. Not after every call: re-allocating cost 4 % of a hidden-32 step and 33 % of
# a default-preset step (page faults on fresh buffers), too much for a Step loop.
SCRATCH_IDLE_SECONDS = 1.0


class Session(SessionState):
    """A named model with its training state. See the module docstring for threading rules."""

    def __init__(
        self,
        session_id: str,
        *,
        create_time: float,
        update_time: float | None = None,
    ) -> None:
        self.id = session_id
        self.lock = threading.Lock()  # guards trainer and history against worker threads
        self.io_lock = threading.Lock()  # serialises checkpoint writes and the delete of the file
        self.trainer: Trainer | None = None
        self._hist = np.zeros(0, dtype=np.float64)
        self._n = 0  # steps recorded; history is _hist[:_n]
        self.loss = 0.0
        self.smoothed_loss = 0.0
        # Validation losses by step (dropped on eviction, restored from the checkpoint), and
        # the newest one, kept while evicted for GetSession.
        self.validation: dict[int, float] = {}
        self.validation_step = 0
        self.validation_loss = 0.0
        self.create_time = create_time
        self.update_time = update_time if update_time is not None else create_time
        self.last_used = time.monotonic()
        self.summary = Summary(None, "", 0, 0)
        self.broken_error: str | None = None
        self.broken_damaged = True  # False: the file is intact, only over this server's limits
        self.checkpointed_step = -1  # -1: never written
        self.checkpoint_error: str | None = None  # why the last checkpoint failed (for clients)
        self.dirty = True
        self.deleted = False
        self.busy: str | None = None  # "Train", "Step" or "AppendText" while one runs
        # How long the last few single corpus steps took: their minimum is the step's cost
        # without the noise of a busy machine (one slow step must not leave the inline path).
        self.step_seconds: deque[float] = deque(maxlen=4)
        self.cancel = threading.Event()
        self.stop_cause = StopCause.NONE
        self.users = 0  # in-flight RPCs using the trainer: no eviction meanwhile
        self.watchers = 0
        self.closing = False  # watch streams end (delete, shutdown)
        self.load_lock = asyncio.Lock()
        self.checkpoint_task: asyncio.Task[None] | None = None
        # The corpus file on disk (None: not written yet). A snapshot copies the corpus only
        # when the trainer's differs from it (created, AppendText, a version-1 checkpoint).
        self.corpus_on_disk: CorpusRef | None = None
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
    def broken(cls, session_id: str, error: str, mtime: float, damaged: bool = True) -> Session:
        """A placeholder for a checkpoint that could not be read."""
        session = cls(session_id, create_time=mtime)
        session.broken_error = error
        session.broken_damaged = damaged
        session.dirty = False
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
        return session

    def reconfigure(self, changes: dict[str, Any]) -> None:
        """Apply setting changes to the trainer (worker thread); see Trainer.reconfigure."""
        with self.lock:
            self.require_trainer().reconfigure(**changes)
            self._touch()

    def evict(self) -> bool:
        """Drop the Trainer and history from memory if nothing needs them; True if dropped."""
        if (
            self.trainer is None
            or self.busy
            or self.users
            or self.watchers
            or self.dirty
            or self.checkpointed_step != self._n
        ):
            return False
        with self.lock:
            self.trainer = None
            self._hist = np.zeros(0, dtype=np.float64)
            self.validation = {}
        return True

    # ----- state ------------------------------------------------------------------------

    @property
    def resident(self) -> bool:
        """True when the Trainer is in memory."""
        return self.trainer is not None

    @property
    def step(self) -> int:
        """Updates applied so far (also the length of the loss history)."""
        return self._n

    def require_trainer(self) -> Trainer:
        """The Trainer, or SessionBrokenError if the session could not be loaded."""
        if self.broken_error is not None:
            raise SessionBrokenError(
                f"session {self.id!r} could not be loaded: {self.broken_error}; "
                "fix or remove the file, or delete the session",
                session_id=self.id,
                damaged=self.broken_damaged,
            )
        if self.trainer is None:  # pragma: no cover - the registry loads before use
            raise SessionBrokenError(f"session {self.id!r} is not loaded", session_id=self.id)
        return self.trainer

    def history(self, start: int, stop: int) -> np.ndarray:
        """Losses of steps start+1 .. stop (0-based slice of the history), a copy."""
        return self._hist[start : min(stop, self._n)].copy()

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

    def _record(self, result: StepResult, validation: float | None = None) -> None:
        """Append one update's loss, and its validation loss if one was measured (caller
        holds ``lock``). The validation loss is stored before the step count grows, so a
        reader that sees the step sees its validation loss too."""
        if validation is not None:
            step = self._n + 1
            self.validation[step] = validation
            self.validation_step, self.validation_loss = step, validation
        if self._n == len(self._hist):
            grown = np.zeros(max(64, 2 * len(self._hist)), dtype=np.float64)
            grown[: self._n] = self._hist[: self._n]
            self._hist = grown  # assigned before _n grows, so readers never see a short array
        self._hist[self._n] = result.loss
        self.smoothed_loss = (
            result.loss
            if self._n == 0
            else (1 - SMOOTHING) * self.smoothed_loss + SMOOTHING * result.loss
        )
        self.loss = result.loss
        self._n += 1

    # ----- busy flag (event loop only) --------------------------------------------------

    def begin(self, kind: str) -> None:
        """Mark the session busy with ``kind``; SessionBusyError if something already runs."""
        self.require_trainer()
        if self.busy is not None:
            what = "training" if self.busy in ("Train", "Step") else f"running {self.busy}"
            raise SessionBusyError(
                f"session {self.id!r} is {what}; wait for it to finish or cancel it, then retry",
                session_id=self.id,
            )
        self.busy = kind
        self.cancel.clear()
        self.stop_cause = StopCause.NONE

    def end(self) -> None:
        """Clear the busy flag; the trainer's scratch is freed SCRATCH_IDLE_SECONDS later
        unless the session is used again meanwhile."""
        self.busy = None
        self.last_used = self._idle_since = time.monotonic()
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
            if len(self._hist) > self._n:  # doubling left up to half of it unused
                self._hist = self._hist[: self._n].copy()
        finally:
            self.lock.release()

    def request_stop(self, cause: StopCause) -> None:
        """Ask a running Train to stop between two updates."""
        if self.stop_cause is StopCause.NONE:
            self.stop_cause = cause
        self.cancel.set()

    # ----- work done in worker threads --------------------------------------------------

    def train_chunk(
        self, max_steps: int, budget_s: float, plan: TrainPlan | None = None
    ) -> ChunkResult:
        """Run up to max_steps corpus updates for about budget_s seconds (worker thread).

        Checks the cancel flag before every update; a diverged update is not applied and
        ends the chunk with ``error`` set. With a ``plan``, measures the validation loss on
        its schedule (and after the call's last update) and ends the chunk as soon as one of
        its stop conditions is met (``plan.stop``).
        """
        steps = chars = 0
        last: StepResult | None = None
        deadline = time.perf_counter() + budget_s
        with self.lock:
            trainer = self.require_trainer()
            while steps < max_steps and not self.cancel.is_set():
                try:
                    last = trainer.step()
                except DivergedError as exc:
                    self._touch()
                    return ChunkResult(steps, chars, last, exc)
                validation = None
                if plan is not None:
                    plan.done += 1
                    every = plan.eval_every
                    if every and (plan.done % every == 0 or plan.done == plan.steps):
                        validation = trainer.validation_loss()
                self._record(last, validation)
                steps += 1
                chars += last.chars
                if plan is not None and self._plan_says_stop(plan, last.loss, validation):
                    break
                if time.perf_counter() >= deadline:
                    break
            if steps:
                self._touch()
        return ChunkResult(steps, chars, last)

    def _plan_says_stop(self, plan: TrainPlan, loss: float, validation: float | None) -> bool:
        """Update the plan's guard and early-stopping state; True once a stop condition holds."""
        plan.window_min = min(plan.window_min, loss)
        if validation is not None:
            if plan.best is None or validation < plan.best:
                plan.best, plan.stale = validation, 0
            else:
                plan.stale += 1
                if plan.patience and plan.stale >= plan.patience:
                    plan.stop = "early"
        if plan.until_loss is not None:
            if plan.eval_every:  # with a validation split the target is the validation loss
                if validation is not None and validation <= plan.until_loss:
                    plan.stop = "target"
            elif self.smoothed_loss <= plan.until_loss:
                plan.stop = "target"
        return plan.stop is not None

    def step_once(self, ids: np.ndarray | None) -> StepResult:
        """One update on the corpus (ids None) or on ids from a zero state (worker thread)."""
        with self.lock:
            return self._step(ids)

    def try_step_now(self) -> StepResult | None:
        """One corpus update on the calling thread (the event loop) if recent ones took under
        QUICK_STEP_SECONDS and the lock is free; None otherwise (use step_once in a worker)."""
        if not self.step_seconds or min(self.step_seconds) >= QUICK_STEP_SECONDS:
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
            self.step_seconds.append(time.perf_counter() - started)
        else:
            result = trainer.step_on(ids)
        self._record(result)
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
        self.dirty = True
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
