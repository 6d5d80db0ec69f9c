"""A training job's learning-rate schedule: a linear warm-up from 0, then a cosine or linear
decay to a floor at the job's target step."""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAYS = ("constant", "cosine", "linear")


@dataclass(frozen=True)
class LearningRateSchedule:
    """``rate(update)`` for the updates 0 .. ``total`` - 1 of a job whose peak is ``peak``."""

    warmup_steps: int = 0
    decay: str = "constant"  # one of DECAYS
    min_learning_rate: float | None = None  # None: a tenth of the peak

    def rate(self, peak: float, update: int, total: int) -> float:
        """The learning rate of the job's ``update``-th update (0-based) of ``total``."""
        if self.warmup_steps and update < self.warmup_steps:
            return peak * (update + 1) / self.warmup_steps
        if self.decay == "constant":
            return peak
        floor = self.min_learning_rate if self.min_learning_rate is not None else 0.1 * peak
        span = total - self.warmup_steps
        if span <= 1:
            return peak
        progress = min(max((update - self.warmup_steps) / (span - 1), 0.0), 1.0)
        if self.decay == "cosine":
            return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return peak + (floor - peak) * progress
