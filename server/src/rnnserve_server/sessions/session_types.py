"""The plain values a session hands out and takes in: why a Train stops, one Train call's
plan, what a chunk of training did, and what GetSession reports while the trainer is evicted."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from rnnserve_server.engine.trainer import DivergedError, ModelConfig, StepResult

__all__ = ["ChunkResult", "StopCause", "Summary", "TrainPlan"]


class StopCause(enum.Enum):
    """Why a running Train should stop before its step count."""

    NONE = "none"
    CANCELLED = "cancelled"  # the client went away
    DELETED = "deleted"
    SHUTDOWN = "shutdown"


@dataclass
class TrainPlan:
    """One Train call's evaluation schedule and stop conditions, and its running state.

    Owned by the Train handler; mutated only by ``train_chunk`` (one worker thread at a time)
    and read by the handler between chunks.
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
