"""Comparing sessions through the real CLI and a real server (issue 20 item 1): `plot A B`
(terminal chart, PNG, SVG, CSV), `watch A B` (one live line per session), `show A B` (side by
side) and `list` (model columns, chars/s, validation loss, --sort, --state, --watch)."""

from __future__ import annotations

import csv
import io
import json
import re
import signal
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image
from rnnserve.v1 import rnn_service_pb2 as pb

from tests.cli_runner import rnnserve, rnnserve_running
from tests.test_cli_ux import ANSI, Pty

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

pytestmark = pytest.mark.timeout(120)

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def make(
    server: ServerHandle, session_id: str, steps: int, **config: object
) -> tuple[pb.Session, list[pb.LossPoint]]:
    """A small session trained ``steps`` updates (validation measured every 10 with a
    validation split); its info and whole loss history."""
    settings: dict[str, object] = {"seed": 1, **config}
    with server.client() as client:
        session = client.create_session(TEXT, session_id=session_id, **settings)  # type: ignore[arg-type]
        if steps:
            session.train(steps, report_every=10).wait()
        return session.info(), session.loss_history(1)


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


# ---------------------------------------------------------------------------------------------
# plot A B


def test_plot_overlays_sessions_with_a_legend_by_id(
    module_server: ServerHandle, tmp_path: Path
) -> None:
    _, history_a = make(module_server, "cmp-a", 60, hidden_size=16, validation_fraction=0.2)
    _, history_b = make(module_server, "cmp-b", 40, hidden_size=8)
    ids = ("cmp-a", "cmp-b")

    # In the terminal: one line per session, the validation line of the one that has it.
    chart = rnnserve(module_server, "plot", *ids, "--width", "100", "--height", "25")
    assert chart.returncode == 0, chart.stderr
    assert "cmp-a: step 60, " in chart.stdout and "cmp-b: step 40, " in chart.stdout
    legend = [line for line in chart.stdout.splitlines() if re.search(r"cmp-[ab]\b", line)]
    labels = {m for line in legend for m in re.findall(r"cmp-[ab](?: validation)?", line)}
    assert labels == {"cmp-a", "cmp-a validation", "cmp-b"}  # cmp-b has no validation split
    assert len(chart.stdout.splitlines()) <= 25

    # An image: the same legend (SVG keeps the labels as text); one colour per session.
    svg = tmp_path / "compare.svg"
    wrote = rnnserve(module_server, "plot", *ids, "-o", str(svg))
    assert wrote.returncode == 0, wrote.stderr
    assert f"wrote {svg} (cmp-a: 60 steps, cmp-b: 40 steps)" in wrote.stdout
    assert ET.parse(svg).getroot().tag.endswith("svg")
    text = svg.read_text()
    for label in ("cmp-a", "cmp-a validation", "cmp-b"):
        assert f"<!-- {label} -->" in text
    png = tmp_path / "compare.png"
    assert rnnserve(module_server, "plot", *ids, "-o", str(png)).returncode == 0
    with Image.open(png) as image:
        colors: list[tuple[int, tuple[int, int, int]]] = image.convert("RGB").getcolors(1_000_000)  # type: ignore[assignment]
    blue = sum(n for n, (r, g, b) in colors if b - r > 40 and b - g > 10)  # C0: cmp-a
    orange = sum(n for n, (r, g, b) in colors if r > 200 and 100 < g < 160 and b < 80)  # C1
    assert blue > 100 and orange > 100

    # CSV: a session column, every step of both, the validation values where measured.
    table = rnnserve(module_server, "plot", *ids, "--format", "csv")
    assert table.returncode == 0, table.stderr
    header, *rows = list(csv.reader(io.StringIO(table.stdout)))
    assert header == ["session", "step", "loss", "smoothed", "validation"]
    for session_id, history in (("cmp-a", history_a), ("cmp-b", history_b)):
        mine = [r for r in rows if r[0] == session_id]
        assert [int(r[1]) for r in mine] == [p.step for p in history]
        assert [float(r[2]) for r in mine] == [p.loss for p in history]
        validation = {p.step: p.validation_loss for p in history if p.HasField("validation_loss")}
        assert {int(r[1]): float(r[4]) for r in mine if r[4]} == validation
    assert any(r[4] for r in rows if r[0] == "cmp-a")

    # --json: one object per point, named by session.
    points = json_lines(rnnserve(module_server, "--json", "plot", *ids))
    assert [p["session_id"] for p in points] == ["cmp-a"] * 60 + ["cmp-b"] * 40


def test_plot_of_one_session_keeps_every_series(module_server: ServerHandle) -> None:
    make(module_server, "cmp-one", 30, hidden_size=8, validation_fraction=0.2)
    # The same id twice is one session.
    chart = rnnserve(module_server, "plot", "cmp-one", "cmp-one", "--width", "90")
    assert chart.returncode == 0, chart.stderr
    assert "cmp-one: step 30, loss " in chart.stdout
    for label in ("loss", "smoothed loss", "validation loss"):
        assert label in chart.stdout
    missing = rnnserve(module_server, "plot", "cmp-one", "cmp-nope")
    assert missing.returncode == 3 and "cmp-nope" in missing.stderr


# ---------------------------------------------------------------------------------------------
# watch A B


def test_watch_several_prints_each_sessions_points(module_server: ServerHandle) -> None:
    _, history_a = make(module_server, "cmpw-a", 6, hidden_size=8)
    _, history_b = make(module_server, "cmpw-b", 4, hidden_size=8)
    replay = rnnserve(
        module_server, "watch", "cmpw-a", "cmpw-b", "--from-step", "1", "--count", "4"
    )
    assert replay.returncode == 0, replay.stderr
    lines = [line.split() for line in replay.stdout.splitlines()]
    for session_id, history in (("cmpw-a", history_a), ("cmpw-b", history_b)):
        mine = [line for line in lines if line[0] == session_id]
        assert [int(line[1]) for line in mine] == [1, 2, 3, 4]
        assert [float(line[2]) for line in mine] == pytest.approx([p.loss for p in history[:4]])

    # Live, whoever trains them: a's two last steps from its history, then the new ones.
    watcher = rnnserve_running(
        module_server, "--json", "watch", "cmpw-a", "cmpw-b", "--from-step", "5", "--count", "3"
    )
    try:
        with module_server.client() as client:
            client.session("cmpw-a").step()
            for _ in range(3):
                client.session("cmpw-b").step()
        out, err = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
    assert watcher.returncode == 0, err
    points = [json.loads(line) for line in out.splitlines()]
    steps = {
        sid: [p["step"] for p in points if p["session_id"] == sid] for sid in ("cmpw-a", "cmpw-b")
    }
    assert steps == {"cmpw-a": [5, 6, 7], "cmpw-b": [5, 6, 7]}


def test_watch_several_draws_one_live_line_per_session(module_server: ServerHandle) -> None:
    make(module_server, "cmpt-a", 3, hidden_size=8)
    make(module_server, "cmpt-b", 5, hidden_size=8)
    term = Pty(module_server, "watch", "cmpt-a", "cmpt-b", "--interval", "0.2")
    try:
        term.read_until(
            lambda t: "cmpt-a: idle at step 3  loss" in t and "cmpt-b: idle at step 5  loss" in t
        )
        with module_server.client() as client:
            client.session("cmpt-b").train(20, report_every=10).wait()
        mark = len(term.output)
        term.read_until(lambda t: "cmpt-b: idle at step 25  loss" in t[mark:])
        screen = ANSI.sub("", term.text[mark:])
        assert "cmpt-a: idle at step 3" in screen  # both lines are redrawn together
        term.process.send_signal(signal.SIGINT)
        output = term.read_to_end()
    finally:
        term.close()
    assert term.process.returncode == 130
    # The block is erased at the end: back to its first line, then clear to the end.
    assert output.rstrip("\r\n").endswith("\x1b[1A\r\x1b[J"), repr(output[-200:])


def test_watch_several_plot_draws_one_chart(module_server: ServerHandle) -> None:
    make(module_server, "cmpp-a", 12, hidden_size=8)
    make(module_server, "cmpp-b", 12, hidden_size=8, validation_fraction=0.2)
    args = ("watch", "cmpp-a", "cmpp-b", "--plot", "--count", "12", "--width", "90")
    chart = rnnserve(module_server, *args)  # piped: drawn once, when the points are in
    assert chart.returncode == 0, chart.stderr
    assert "cmpp-a: step 12, " in chart.stdout and "cmpp-b: step 12, " in chart.stdout
    assert "cmpp-b validation" in chart.stdout


# ---------------------------------------------------------------------------------------------
# show A B


def test_show_puts_sessions_side_by_side(module_server: ServerHandle) -> None:
    make(
        module_server,
        "cmps-a",
        10,
        cell="rnn",
        num_layers=1,
        hidden_size=16,
        validation_fraction=0.2,
    )
    make(module_server, "cmps-b", 0, hidden_size=8, cell="gru", num_layers=2)
    result = rnnserve(module_server, "show", "cmps-a", "cmps-b")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["cmps-a", "cmps-b"]
    table = {row[2:].split()[0]: (row[:1], row[2:].split()[1:]) for row in rows}
    assert table["hidden_size"] == ("*", ["16", "8"])
    assert table["cell"] == ("*", ["rnn", "gru"])
    assert table["num_layers"] == ("*", ["1", "2"])
    assert table["dtype"] == (" ", ["float32", "float32"])  # the same: not marked
    assert table["step"] == ("*", ["10", "0"])
    assert table["validation"][1][0] != "-" and table["validation"][1][-1] == "-"
    assert table["chars/s"][1][-1] == "-"  # never trained
    objects = json_lines(rnnserve(module_server, "--json", "show", "cmps-a", "cmps-b"))
    assert [o["session_id"] for o in objects] == ["cmps-a", "cmps-b"]


# ---------------------------------------------------------------------------------------------
# list


def columns(result: subprocess.CompletedProcess[str]) -> tuple[list[str], list[list[str]]]:
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    return header.split(), [row.split() for row in rows]


def test_list_columns_sort_and_state_filter(server: ServerHandle) -> None:
    a, _ = make(
        server, "ls-a", 20, cell="rnn", num_layers=1, hidden_size=16, validation_fraction=0.2
    )
    b, _ = make(server, "ls-b", 10, hidden_size=8, cell="gru", num_layers=2)
    c, _ = make(server, "ls-c", 0, preset="notebook")
    assert a.HasField("chars_per_second") and a.chars_per_second > 0  # a Train measured it
    assert not c.HasField("chars_per_second")  # never trained

    header, rows = columns(rnnserve(server, "list"))
    assert header == [
        "ID", "STATE", "CELL", "LAYERS", "HIDDEN", "OPTIMIZER", "STEP", "LOSS", "VAL_LOSS",
        "CHARS/S", "CREATED", "CHECKPOINTED",
    ]  # fmt: skip
    by_id = {row[0]: row for row in rows}
    assert by_id["ls-a"][:7] == ["ls-a", "ready", "rnn", "1", "16", "adam", "20"]
    assert by_id["ls-a"][8] == f"{a.validation_loss:.4f}"
    assert by_id["ls-a"][9] == f"{a.chars_per_second:,.0f}"
    assert by_id["ls-b"][:7] == ["ls-b", "ready", "gru", "2", "8", "adam", "10"]
    assert by_id["ls-b"][8] == "-"  # no validation split
    assert by_id["ls-c"][2:10] == ["rnn", "1", "100", "sgd", "0", "-", "-", "-"]

    def order(*flags: str) -> list[str]:
        return [row[0] for row in columns(rnnserve(server, "list", *flags))[1]]

    assert order() == ["ls-a", "ls-b", "ls-c"]  # by id
    assert order("--sort", "step") == ["ls-c", "ls-b", "ls-a"]
    assert order("--sort", "step", "--reverse") == ["ls-a", "ls-b", "ls-c"]
    assert order("--sort", "hidden", "-r") == ["ls-c", "ls-a", "ls-b"]
    assert order("--sort", "cell") == ["ls-b", "ls-a", "ls-c"]  # gru < rnn; ties by id
    # Sessions without the value come last, whichever the direction.
    assert order("--sort", "val_loss")[0] == "ls-a"
    assert order("--sort", "chars/s", "-r")[-1] == "ls-c"
    by_speed = sorted([a, b], key=lambda s: -s.chars_per_second)
    assert order("--sort", "chars/s", "-r")[:2] == [s.session_id for s in by_speed]

    assert order("--state", "ready") == ["ls-a", "ls-b", "ls-c"]
    none = rnnserve(server, "list", "--state", "training", "--state", "broken")
    assert (
        none.returncode == 0
        and none.stdout == "no sessions in state training or broken (3 in others)\n"
    )
    listed = json_lines(rnnserve(server, "--json", "list", "--sort", "step"))
    assert [s["session_id"] for s in listed] == ["ls-c", "ls-b", "ls-a"]
    assert listed[2]["chars_per_second"] == pytest.approx(a.chars_per_second)

    bad = rnnserve(server, "list", "--sort", "colour")
    assert bad.returncode == 2 and "--sort" in bad.stderr and "val_loss" in bad.stderr


def test_list_watch_redraws_until_ctrl_c(server: ServerHandle) -> None:
    make(server, "lw-a", 0, hidden_size=8)
    term = Pty(server, "list", "--watch", "0.2")
    try:
        term.read_until(lambda t: "lw-a" in t)
        make(server, "lw-b", 0, hidden_size=8)
        mark = len(term.output)
        screen = term.read_until(lambda t: "lw-b" in t[mark:])
        term.process.send_signal(signal.SIGINT)
        term.read_to_end()
    finally:
        term.close()
    assert term.process.returncode == 130
    assert "every 0.2 s" in screen and term.output.count(b"\x1b[H\x1b[2J") >= 2
