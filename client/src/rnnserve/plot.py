"""Sessions' loss histories as data: a terminal chart (plotext), an image (matplotlib), CSV.

:class:`LossHistory` holds one column per series, aligned on ``steps``. The series are
listed once in ``SERIES``; a series whose values are all missing (validation loss on a
session without a validation split) is left out of charts and CSV. A chart is a list of
:class:`Line`: every series of one session (:func:`history_lines`), or the smoothed and
validation loss of several sessions, one colour each (:func:`compare_lines`).

plotext is a dependency of the client; matplotlib is the optional extra ``rnnserve[plot]``,
imported only when an image is written.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
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


class MovingAverage:
    """The server's smoothed loss, recomputed from the raw losses in step order."""

    def __init__(self) -> None:
        self.value: float | None = None

    def add(self, loss: float) -> float:
        """Take the next loss; returns the average after it."""
        if self.value is None or not math.isfinite(self.value):
            self.value = loss
        else:
            self.value = (1 - SMOOTHING) * self.value + SMOOTHING * loss
        return self.value


@dataclass
class LossHistory:
    """Loss per step; ``columns[name][i]`` belongs to ``steps[i]`` (None: no value)."""

    steps: list[int] = field(default_factory=list)
    columns: dict[str, list[float | None]] = field(
        default_factory=lambda: {s.name: [] for s in SERIES}
    )
    _smoothed: MovingAverage = field(default_factory=MovingAverage)

    def add(self, point: pb.LossPoint) -> None:
        """Append one point (points arrive in step order)."""
        self.steps.append(point.step)
        for series in SERIES:
            if series.value is not None:
                self.columns[series.name].append(series.value(point))
        self.columns["smoothed"].append(self._smoothed.add(point.loss))

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


def write_csv(histories: LossHistory | Mapping[str, LossHistory], stream: TextIO) -> None:
    """``step,loss,smoothed[,validation]`` with a header; missing values are empty. For
    several sessions (a mapping id -> history) a ``session`` column comes first."""
    named = histories if isinstance(histories, Mapping) else {"": histories}
    names = {s.name for h in named.values() for s in h.present()}
    present = [s for s in SERIES if s.name in names] or SERIES[:2]
    several = isinstance(histories, Mapping)
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow([*(["session"] if several else []), "step", *(s.name for s in present)])
    for session_id, history in named.items():
        for i, step in enumerate(history.steps):
            row: list[Any] = [session_id] if several else []
            row.append(step)
            for s in present:
                value = history.columns[s.name][i]
                row.append("" if value is None else repr(float(value)))
            writer.writerow(row)


@dataclass(frozen=True)
class Line:
    """One line of a chart: its legend label, the series it shows (which sets its style), its
    colour (``group``: lines of one group share a colour) and its points."""

    label: str
    series: str
    group: int
    steps: list[int]
    values: list[float]


def history_lines(history: LossHistory) -> list[Line]:
    """One session's chart: every series that has values, each in its own colour."""
    return [
        Line(s.label, s.name, group, *history.points(s.name))
        for group, s in enumerate(history.present())
    ]


def compare_lines(histories: Mapping[str, LossHistory]) -> list[Line]:
    """Several sessions on one chart, one colour each: a session's smoothed loss labelled
    by its id, and its validation loss ("ID validation") when it has one. (The raw loss of
    several sessions would hide the differences under its noise.)"""
    lines: list[Line] = []
    for group, (session_id, history) in enumerate(histories.items()):
        present = {s.name for s in history.present()}
        if "smoothed" in present:
            lines.append(Line(session_id, "smoothed", group, *history.points("smoothed")))
        if "validation" in present:
            steps, values = history.points("validation")
            lines.append(Line(f"{session_id} validation", "validation", group, steps, values))
    return lines


def _lines(chart: LossHistory | Sequence[Line]) -> Sequence[Line]:
    return history_lines(chart) if isinstance(chart, LossHistory) else chart


# plotext's colours in the order it gives them to lines, so a group keeps its colour.
TERMINAL_COLORS = ["blue+", "green+", "red+", "cyan+", "magenta+", "yellow", "gray"]


def terminal_chart(
    chart: LossHistory | Sequence[Line], title: str, width: int, height: int, color: bool = True
) -> str:
    """The chart (a session's history, or lines) as text (ANSI colours when ``color``),
    ``width`` x ``height`` characters."""
    import plotext as plt

    plt.clear_figure()
    plt.plotsize(width, height)
    if not color:
        plt.theme("clear")
    plt.title(title)
    plt.xlabel("step")
    plt.ylabel("nats/char")
    for line in _lines(chart):
        plt.plot(
            line.steps,
            line.values,
            label=line.label,
            marker="dot" if line.series == "validation" else "braille",
            color=TERMINAL_COLORS[line.group % len(TERMINAL_COLORS)],
        )
    text: str = plt.build()
    plt.clear_figure()
    return text if color else str(plt.uncolorize(text))


# matplotlib styles by series; the colour comes from the line's group (C0, C1, ...).
IMAGE_STYLES: dict[str, dict[str, Any]] = {
    "loss": {"alpha": 0.5, "linewidth": 0.8},
    "smoothed": {"linewidth": 2.0},
    "validation": {"linestyle": "--", "marker": "o", "markersize": 3},
}


def save_image(chart: LossHistory | Sequence[Line], title: str, path: Path) -> None:
    """Write the chart (a session's history, or lines) as PNG or SVG (by the suffix) with
    matplotlib.

    Raises ImportError with the install hint when the ``plot`` extra is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as mpl
    except ImportError as e:
        raise ImportError("writing an image needs matplotlib: pip install 'rnnserve[plot]'") from e
    lines = _lines(chart)
    fig, ax = mpl.subplots(figsize=(8, 4.5), dpi=100)
    try:
        for line in lines:
            style = IMAGE_STYLES.get(line.series, {})
            ax.plot(line.steps, line.values, label=line.label, color=f"C{line.group}", **style)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/char)")
        ax.grid(True, alpha=0.3)
        if lines:
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, format=path.suffix.lstrip(".").lower())
    finally:
        mpl.close(fig)
