"""A session's loss history as data: a terminal chart (plotext), an image (matplotlib), CSV.

:class:`LossHistory` holds one column per series, aligned on ``steps``. The series are
listed once in ``SERIES``; a series whose values are all missing (validation loss on a
session without a validation split) is left out of charts and CSV.

plotext is a dependency of the client; matplotlib is the optional extra ``rnnserve[plot]``,
imported only when an image is written.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from rnnserve.v1 import rnn_service_pb2 as pb

# Weight of the newest loss in the moving average: the server's smoothed_loss uses the same
# (rnnserve_server.sessions.loss_history.SMOOTHING), so the last smoothed value matches GetSession.
SMOOTHING = 0.02

IMAGE_SUFFIXES = (".png", ".svg")


def _optional(name: str) -> Callable[[pb.LossPoint], float | None]:
    """The value of an optional LossPoint field, None when unset (or unknown to this proto)."""

    def get(point: pb.LossPoint) -> float | None:
        if name not in point.DESCRIPTOR.fields_by_name or not point.HasField(name):
            return None
        value: float = getattr(point, name)
        return value

    return get


@dataclass(frozen=True)
class Series:
    """One column: its CSV name, its legend label and how a point gives its value."""

    name: str
    label: str
    value: Callable[[pb.LossPoint], float | None] | None  # None: computed from the loss column


# In column order. A new per-point series is one line here.
SERIES: list[Series] = [
    Series("loss", "loss", lambda p: p.loss),
    Series("smoothed", "smoothed loss", None),
    Series("validation", "validation loss", _optional("validation_loss")),
]


@dataclass
class LossHistory:
    """Loss per step; ``columns[name][i]`` belongs to ``steps[i]`` (None: no value)."""

    steps: list[int] = field(default_factory=list)
    columns: dict[str, list[float | None]] = field(
        default_factory=lambda: {s.name: [] for s in SERIES}
    )
    _smoothed: float | None = None

    def add(self, point: pb.LossPoint) -> None:
        """Append one point (points arrive in step order)."""
        self.steps.append(point.step)
        for series in SERIES:
            if series.value is not None:
                self.columns[series.name].append(series.value(point))
        loss = point.loss
        if self._smoothed is None or not math.isfinite(self._smoothed):
            self._smoothed = loss
        else:
            self._smoothed = (1 - SMOOTHING) * self._smoothed + SMOOTHING * loss
        self.columns["smoothed"].append(self._smoothed)

    def extend(self, points: Iterable[pb.LossPoint]) -> None:
        """Append points in step order."""
        for point in points:
            self.add(point)

    def __len__(self) -> int:
        return len(self.steps)

    def present(self) -> list[Series]:
        """The series that have at least one value."""
        return [s for s in SERIES if any(v is not None for v in self.columns[s.name])]

    def points(self, name: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one series, skipping missing values."""
        pairs = [
            (s, v) for s, v in zip(self.steps, self.columns[name], strict=True) if v is not None
        ]
        return [s for s, _ in pairs], [v for _, v in pairs]


def write_csv(history: LossHistory, stream: TextIO) -> None:
    """``step,loss,smoothed[,validation]`` with a header; missing values are empty."""
    present = history.present() or SERIES[:2]
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(["step", *(s.name for s in present)])
    for i, step in enumerate(history.steps):
        row: list[Any] = [step]
        for s in present:
            value = history.columns[s.name][i]
            row.append("" if value is None else repr(float(value)))
        writer.writerow(row)


def terminal_chart(
    history: LossHistory, title: str, width: int, height: int, color: bool = True
) -> str:
    """The chart as text (ANSI colours when ``color``), ``width`` x ``height`` characters."""
    import plotext as plt

    plt.clear_figure()
    plt.plotsize(width, height)
    if not color:
        plt.theme("clear")
    plt.title(title)
    plt.xlabel("step")
    plt.ylabel("nats/char")
    for series in history.present():
        steps, values = history.points(series.name)
        plt.plot(steps, values, label=series.label, marker="braille")
    text: str = plt.build()
    plt.clear_figure()
    return text if color else str(plt.uncolorize(text))


def save_image(history: LossHistory, title: str, path: Path) -> None:
    """Write the chart as PNG or SVG (by the suffix) with matplotlib.

    Raises ImportError with the install hint when the ``plot`` extra is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as mpl
    except ImportError as e:
        raise ImportError("writing an image needs matplotlib: pip install 'rnnserve[plot]'") from e
    fig, ax = mpl.subplots(figsize=(8, 4.5), dpi=100)
    try:
        styles: dict[str, dict[str, Any]] = {
            "loss": {"alpha": 0.5, "linewidth": 0.8},
            "smoothed": {"linewidth": 2.0},
        }
        for series in history.present():
            steps, values = history.points(series.name)
            ax.plot(steps, values, label=series.label, **styles.get(series.name, {}))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/char)")
        ax.grid(True, alpha=0.3)
        if len(history):
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, format=path.suffix.lstrip(".").lower())
    finally:
        mpl.close(fig)
