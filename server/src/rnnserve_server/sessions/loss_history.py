"""A session's losses: one per update, the smoothed loss, and the validation losses measured.

Written only by the session, under its ``lock``; read under the same lock for checkpoints, or
without it by readers that tolerate a point being added meanwhile (GetSession, WatchLoss).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Weight of the newest loss in the exponential moving average reported as smoothed_loss.
SMOOTHING = 0.02


class LossHistory:
    """The loss of every update so far (``step`` of them) and the values derived from it."""

    def __init__(self) -> None:
        self._values = np.zeros(0, dtype=np.float64)  # history is _values[:step]
        self.step = 0  # updates recorded
        self.loss = 0.0
        self.smoothed_loss = 0.0
        # Validation losses by step (dropped on eviction, restored from the checkpoint), and
        # the newest one, kept while evicted for GetSession.
        self.validation: dict[int, float] = {}
        self.validation_step = 0
        self.validation_loss = 0.0

    @property
    def capacity(self) -> int:
        """Losses the history has room for before it grows (doubling)."""
        return len(self._values)

    def since(self, start: int, stop: int) -> np.ndarray:
        """Losses of steps start+1 .. stop (0-based slice of the history), a copy."""
        return self._values[start : min(stop, self.step)].copy()

    def record(self, loss: float, validation: float | None = None) -> None:
        """Append one update's loss, and its validation loss if one was measured. The
        validation loss is stored before the step count grows, so a reader that sees the step
        sees its validation loss too."""
        if validation is not None:
            step = self.step + 1
            self.validation[step] = validation
            self.validation_step, self.validation_loss = step, validation
        n = self.step
        if n == len(self._values):
            grown = np.zeros(max(64, 2 * len(self._values)), dtype=np.float64)
            grown[:n] = self._values[:n]
            self._values = grown  # assigned before step grows, so readers never see a short array
        self._values[n] = loss
        self.smoothed_loss = (
            loss if n == 0 else (1 - SMOOTHING) * self.smoothed_loss + SMOOTHING * loss
        )
        self.loss = loss
        self.step = n + 1

    def restore(self, history: np.ndarray, meta: dict[str, Any]) -> None:
        """The history of a checkpoint: its losses and its session fields (``meta``)."""
        self._values = np.array(history, dtype=np.float64)
        self.step = len(self._values)
        self.loss = float(meta.get("loss", 0.0))
        self.smoothed_loss = float(meta.get("smoothed_loss", 0.0))
        self._restore_validation(meta.get("validation"))

    def _restore_validation(self, value: Any) -> None:
        """Restore the validation losses from a checkpoint's ``[[step, loss], ...]``; entries
        that are not a (step within the history, finite loss) pair are dropped."""
        points: dict[int, float] = {}
        if isinstance(value, list):
            for item in value:
                if (
                    isinstance(item, list)
                    and len(item) == 2
                    and isinstance(item[0], int)
                    and 0 < item[0] <= self.step
                    and isinstance(item[1], int | float)
                    and math.isfinite(item[1])
                ):
                    points[item[0]] = float(item[1])
        self.validation = points
        if points:
            self.validation_step = max(points)
            self.validation_loss = points[self.validation_step]
        else:
            self.validation_step, self.validation_loss = 0, 0.0

    def drop(self) -> None:
        """Free the losses while the session is evicted (the checkpoint has them); the step
        count and the newest values stay for GetSession."""
        self._values = np.zeros(0, dtype=np.float64)
        self.validation = {}

    def trim(self) -> None:
        """Free the unused capacity (doubling left up to half of it unused)."""
        if len(self._values) > self.step:
            self._values = self._values[: self.step].copy()

    def meta(self) -> dict[str, Any]:
        """The checkpoint's loss fields."""
        return {
            "step": self.step,
            "loss": self.loss,
            "smoothed_loss": self.smoothed_loss,
            # [[step, loss], ...] in step order: the validation losses measured so far.
            "validation": [[k, v] for k, v in sorted(self.validation.items())],
        }
