"""rnnserve.plot without a server: the series, the moving average, CSV and the chart text."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from PIL import Image
from rnnserve import plot
from rnnserve.v1 import rnn_service_pb2 as pb


def history(losses: list[float]) -> plot.LossHistory:
    h = plot.LossHistory()
    h.extend(pb.LossPoint(step=i + 1, loss=v) for i, v in enumerate(losses))
    return h


def test_smoothed_is_the_servers_moving_average() -> None:
    h = history([4.0, 2.0, 3.0])
    expected = [4.0, 0.98 * 4.0 + 0.02 * 2.0]
    expected.append(0.98 * expected[1] + 0.02 * 3.0)
    assert h.columns["smoothed"] == pytest.approx(expected)
    assert [s.name for s in h.present()] == ["loss", "smoothed"]  # no validation values


def test_csv_has_a_validation_column_only_when_there_are_values() -> None:
    h = history([3.0, 2.5, 2.0])
    out = io.StringIO()
    plot.write_csv(h, out)
    assert out.getvalue().splitlines()[0] == "step,loss,smoothed"
    # A session with a validation split reports it every few steps: empty cells between.
    h.columns["validation"] = [None, 2.75, None]
    out = io.StringIO()
    plot.write_csv(h, out)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows[0] == ["step", "loss", "smoothed", "validation"]
    assert [r[3] for r in rows[1:]] == ["", "2.75", ""]
    assert plot.terminal_chart(h, "t", 60, 15, color=False).count("validation loss") == 1


def test_uncoloured_chart_has_no_escape_codes(tmp_path: Path) -> None:
    h = history([3.0 - i / 100 for i in range(100)])
    text = plot.terminal_chart(h, "title here", 70, 18, color=False)
    assert "\x1b" not in text and "title here" in text
    assert len(text.splitlines()) == 18
    plot.save_image(h, "t", tmp_path / "x.png")
    with Image.open(tmp_path / "x.png") as image:
        assert image.size == (800, 450)
