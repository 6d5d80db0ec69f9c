"""A training job's record: what it was asked (its spec, plain values), where it is and how it
ended. Kept with its session (``Session.jobs``) and in the session's checkpoint, so a restarted
server knows every job and resumes those that were running.

The spec is the job's TrainingPlan as a dict (usecases/training_plan.py owns its meaning).
Written by the job loop (usecases/training.py) on the event loop, and by ``train_chunk`` for
the fields of ``run`` (under the session lock).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

QUEUED, RUNNING, SUCCEEDED, STOPPED, FAILED = "queued", "running", "succeeded", "stopped", "failed"
ACTIVE = (QUEUED, RUNNING)
STATES = (QUEUED, RUNNING, SUCCEEDED, STOPPED, FAILED)


@dataclass
class JobRecord:
    """One training job of a session."""

    job_id: str
    spec: dict[str, Any]
    state: str = QUEUED
    stop_reason: str = ""  # TrainProgress.stop_reason's words; "" while active
    error: str = ""
    start_step: int = 0
    target_step: int = 0
    end_step: int = 0  # the session's step when it ended
    loss: float = 0.0  # at its end (an active job reports its session's)
    smoothed_loss: float = 0.0
    validation_loss: float | None = None
    best_validation_loss: float | None = None
    best_step: int = 0
    stale: int = 0  # evaluations since best_validation_loss improved (patience)
    chars_per_second: float = 0.0
    seconds_used: float = 0.0
    create_time: float = 0.0
    start_time: float = 0.0  # 0: never ran
    end_time: float = 0.0
    started_by: str = ""
    attached: bool = False
    request_id: str = ""
    # The weights at best_validation_loss (restore_best); not in to_dict: an array.
    best_weights: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def end(self, state: str, reason: str, step: int, loss: float, smoothed_loss: float) -> None:
        """Record that the job ended (``state``, the stop ``reason``) at ``step``."""
        self.state = state
        self.stop_reason = reason
        self.end_time = time.time()
        self.end_step = step
        self.loss, self.smoothed_loss = loss, smoothed_loss

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-able values (best_weights aside)."""
        data = dataclasses.asdict(dataclasses.replace(self, best_weights=None))
        del data["best_weights"]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> JobRecord:
        """A record read from a checkpoint; ValueError if it is not one."""
        if not isinstance(data, dict):
            raise ValueError("a job record is not an object")
        known = {f.name for f in dataclasses.fields(cls)} - {"best_weights"}
        values = {k: v for k, v in data.items() if k in known}
        record = cls(**values)
        if not isinstance(record.job_id, str) or not isinstance(record.spec, dict):
            raise ValueError("a job record has no job_id or spec")
        if record.state not in STATES:
            raise ValueError(f"a job record's state {record.state!r} is unknown")
        for name in ("start_step", "target_step", "end_step", "best_step", "stale"):
            if not isinstance(getattr(record, name), int):
                raise ValueError(f"a job record's {name} is not an integer")
        for name in ("seconds_used", "create_time", "start_time", "end_time", "loss"):
            value = getattr(record, name)
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"a job record's {name} is not a finite number")
        return record
