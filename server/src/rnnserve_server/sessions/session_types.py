"""The plain values a session hands out and takes in: why a Train stops, one Train call's
run, what a chunk of training did, what GetSession reports while the trainer is evicted, and
the records of a session that other parts write (each says whose it is)."""

from __future__ import annotations

import asyncio
import enum
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rnnserve_server.engine.model_config import DivergedError, ModelConfig, StepResult
from rnnserve_server.sessions.job_record import JobRecord
from rnnserve_server.storage.checkpoint import CorpusRef

__all__ = [
    "Broken",
    "CheckpointState",
    "ChunkResult",
    "StopCause",
    "Summary",
    "TrainRun",
    "Use",
]


class StopCause(enum.Enum):
    """Why a running Train should stop before its step count."""

    NONE = "none"
    CANCELLED = "cancelled"  # the client went away
    STOPPED = "stopped"  # StopJob
    DELETED = "deleted"
    SHUTDOWN = "shutdown"
    LEASE_LOST = "lease_lost"  # cluster mode: another replica owns the session now
    MOVED = "moved"  # cluster mode: its job is handed to a replica with a free slot


@dataclass
class TrainRun:
    """One Train call's evaluation schedule and stop conditions (its plan, resolved for the
    session), and its running state.

    Owned by the Train use case; mutated only by ``train_chunk`` (one worker thread at a time)
    and read by the use case between chunks.
    """

    steps: int  # updates the call asks for
    eval_every: int = 0  # measure the validation loss every this many updates; 0 never
    until_loss: float | None = None  # stop once the (validation or smoothed) loss is <= this
    patience: int = 0  # stop after this many evaluations in a row without a new best; 0 never
    done: int = 0  # updates applied by this call
    best: float | None = None  # best validation loss of this call
    stale: int = 0  # evaluations since ``best`` improved
    window_min: float = math.inf  # lowest loss since the last report (the runaway guard)
    stop: str | None = None  # "target" or "early" once a condition is met
    # A job's schedule: the learning rate of the update that makes the session's step n + 1.
    learning_rate: Callable[[int], float] | None = None
    job: JobRecord | None = None  # the job's record: its best loss and patience, kept there
    restore_best: bool = False  # keep a copy of the weights at each new best (job.best_weights)


@dataclass
class ChunkResult:
    """What one executor call of training did."""

    steps: int
    chars: int
    last: StepResult | None
    error: DivergedError | None = None


@dataclass
class Summary:
    """What GetSession/ListSessions report, kept while the Trainer is evicted."""

    config: ModelConfig | None
    alphabet: str
    corpus_chars: int
    parameter_count: int
    corpus_bytes: int = 0  # UTF-8 size of the corpus, for the corpus limits
    validation_chars: int = 0  # the held-out tail's length


@dataclass
class CheckpointState:
    """A session's checkpoints, written by the checkpoint writer (the session sets ``dirty``
    on every change, and all of it when it loads a checkpoint)."""

    dirty: bool = True  # changed since the last write began
    step: int = -1  # the step the last write saved; -1: never written
    error: str | None = None  # why the last write failed (for clients)
    task: asyncio.Task[None] | None = None  # the write in flight, if any
    # The corpus file on disk (None: not written yet). A snapshot copies the corpus only
    # when the trainer's differs from it (created, AppendText, a version-1 checkpoint).
    corpus_on_disk: CorpusRef | None = None
    # Serialises checkpoint writes and the delete of the files.
    io_lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Use:
    """Who uses a session and since when it is idle: the registry counts the calls holding it
    loaded (``users``), WatchLoss its watchers, the session stamps ``last_used`` when a call
    ends; residency reads it to choose what to evict."""

    users: int = 0
    watchers: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Broken:
    """Why a session's checkpoint can't be loaded (set by the factory or the registry):
    ``reason`` for clients; ``damaged`` False when the file is intact, only over this
    server's limits."""

    reason: str
    damaged: bool = True
