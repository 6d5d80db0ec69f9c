"""Sessions as TensorBoard event files: one run directory per session under a log directory.

What a run holds (the tags are the constants below): every update's loss, the moving average
the server reports as smoothed loss, the validation loss where it was measured, the training
throughput (chars/s) at the steps it was read, text samples, and the session's config as
hyperparameters (TensorBoard's HPARAMS tab compares the runs by them).

Written with tensorboardX, the optional extra ``rnnserve[tensorboard]``, imported only when a
run is opened.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rnnserve.plot import MovingAverage
from rnnserve.v1 import rnn_service_pb2 as pb

LOSS = "loss/train"
SMOOTHED = "loss/smoothed"
VALIDATION = "loss/validation"
SPEED = "speed/chars_per_second"
SAMPLE = "sample"

INSTALL_HINT = "writing TensorBoard files needs tensorboardX: pip install 'rnnserve[tensorboard]'"


def run_directory(logdir: Path, session_id: str) -> Path:
    """The session's run directory; ValueError for an id that is not one plain file name (a
    server's ids are, but the id comes from outside)."""
    if session_id in ("", ".", "..") or "/" in session_id or "\\" in session_id:
        raise ValueError(f"session id {session_id!r} can't name a run directory")
    return logdir / session_id


def hyperparameters(info: pb.Session) -> dict[str, str | float | int]:
    """The session's config as TensorBoard hyperparameters (enums by their short names, as
    the CLI spells them), plus its parameter count."""
    values: dict[str, str | float | int] = {}
    for field in pb.SessionConfig.DESCRIPTOR.fields:
        value = getattr(info.config, field.name)
        if field.enum_type is not None:
            prefix = field.enum_type.values[0].name.removesuffix("UNSPECIFIED")  # "CELL_"
            name = field.enum_type.values_by_number.get(value)
            value = name.name.removeprefix(prefix).lower().replace("_", "-") if name else value
        values[field.name] = value
    values["parameter_count"] = info.parameter_count
    return values


def as_markdown_code(text: str) -> str:
    """TensorBoard renders text as Markdown: indented by four spaces, a sample keeps its
    lines and characters."""
    return "\n".join("    " + line for line in text.split("\n"))


class SessionRun:
    """One session's run directory, open for writing. Its old event files are removed first:
    the server's history is the truth, and writing it twice would draw every point twice."""

    def __init__(self, logdir: Path, session_id: str) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e
        self.directory = run_directory(logdir, session_id)
        if self.directory.is_dir():
            for old in self.directory.glob("events.out.tfevents.*"):
                old.unlink()
        # flush_secs: live points reach the file within about a second.
        self.writer: Any = SummaryWriter(logdir=str(self.directory), flush_secs=1)
        self.smoothed = MovingAverage()
        self.points = 0  # loss points written
        self.step = 0  # the newest step written

    def hyperparameters(self, info: pb.Session) -> None:
        """The config as the HPARAMS tab's session (its metrics are this run's scalars)."""
        from tensorboardX.summary import hparams

        _, start, _ = hparams(hyperparameters(info), {})
        self.writer.file_writer.add_summary(start)

    def add_points(self, points: Iterable[pb.LossPoint]) -> None:
        """Loss, smoothed loss and (where measured) validation loss of each point, in step
        order."""
        for point in points:
            self.writer.add_scalar(LOSS, point.loss, point.step)
            self.writer.add_scalar(SMOOTHED, self.smoothed.add(point.loss), point.step)
            if point.HasField("validation_loss"):
                self.writer.add_scalar(VALIDATION, point.validation_loss, point.step)
            self.points += 1
            self.step = point.step

    def add_speed(self, step: int, chars_per_second: float) -> None:
        if math.isfinite(chars_per_second):
            self.writer.add_scalar(SPEED, chars_per_second, step)

    def add_sample(self, step: int, text: str) -> None:
        self.writer.add_text(SAMPLE, as_markdown_code(text), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
