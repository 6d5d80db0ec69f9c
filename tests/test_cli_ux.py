"""The CLI's views against a real server: plot (terminal chart in a pty, PNG, SVG, CSV),
watch's status line and live chart, the list table, did-you-mean, delete confirmation,
shell completion, and the small fixes from the README walk-through."""

from __future__ import annotations

import csv
import fcntl
import io
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from PIL import Image
from rnnserve import Client
from rnnserve.v1 import rnn_service_pb2 as pb

from tests.cli_runner import cli_env, rnnserve, train_in_background

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

pytestmark = pytest.mark.timeout(120)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def trained(server: ServerHandle, session_id: str, steps: int) -> pb.Session:
    """A small session trained ``steps`` updates."""
    with server.client() as client:
        session = client.create_session(TEXT, session_id=session_id, hidden_size=16, seed=1)
        session.train(steps, report_every=10).wait()
        return session.info()


class Pty:
    """``python -m rnnserve ARGS`` with stdin, stdout and stderr on a pseudo-terminal."""

    def __init__(self, server: ServerHandle, *args: str, cols: int = 100, rows: int = 30) -> None:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.master = master
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rnnserve", "--address", server.address, *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=cli_env(),
            start_new_session=True,
        )
        os.close(slave)
        self.output = b""

    def read_until(self, predicate: Callable[[str], bool], timeout: float = 60.0) -> str:
        """Read until ``predicate(text so far)`` holds (or EOF/timeout: AssertionError)."""
        deadline = time.monotonic() + timeout
        while not predicate(self.text):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out; output so far:\n{self.text!r}"
            ready, _, _ = select.select([self.master], [], [], min(remaining, 0.5))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    assert predicate(self.text), f"EOF; output:\n{self.text!r}"
                    break
                self.output += chunk
        return self.text

    def read_to_end(self, timeout: float = 60.0) -> str:
        """Everything until the process exits and the terminal closes."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out; output so far:\n{self.text!r}"
            ready, _, _ = select.select([self.master], [], [], min(remaining, 0.5))
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                self.output += chunk
        self.process.wait(timeout=30)
        return self.text

    def write(self, text: str) -> None:
        os.write(self.master, text.encode())

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        os.close(self.master)


# ---------------------------------------------------------------------------------------------
# plot


def test_plot_png_is_a_real_chart(module_server: ServerHandle, tmp_path: Path) -> None:
    trained(module_server, "plot-png", 60)
    png = tmp_path / "loss.png"
    result = rnnserve(module_server, "plot", "plot-png", "--output", str(png))
    assert result.returncode == 0, result.stderr
    assert f"wrote {png} (60 steps)" in result.stdout
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size == (800, 450)
        pixels = image.convert("RGB")
        colors = pixels.getcolors(maxcolors=1_000_000)
        assert colors is not None
        white = sum(count for count, rgb in colors if rgb == (255, 255, 255))
        # Not blank: axes, labels and two curves cover part of the canvas, in several colours.
        assert white < 0.95 * image.size[0] * image.size[1]
        assert len(colors) > 20
        # The two series have matplotlib's first two colours (C0 blue, C1 orange).
        rgb_counts: list[tuple[int, tuple[int, int, int]]] = colors  # type: ignore[assignment]
        blueish = sum(count for count, (r, g, b) in rgb_counts if b - r > 40 and b - g > 10)
        orangeish = sum(
            count for count, (r, g, b) in rgb_counts if r > 200 and 100 < g < 160 and b < 80
        )
        assert blueish > 100 and orangeish > 100


def test_plot_svg_and_bad_suffix(module_server: ServerHandle, tmp_path: Path) -> None:
    trained(module_server, "plot-svg", 20)
    svg = tmp_path / "loss.svg"
    result = rnnserve(module_server, "plot", "plot-svg", "-o", str(svg))
    assert result.returncode == 0, result.stderr
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    text = svg.read_text()
    assert "smoothed loss" in text or "smoothed" in text
    bad = rnnserve(module_server, "plot", "plot-svg", "-o", str(tmp_path / "loss.jpg"))
    assert bad.returncode == 2 and "--output must end in .png or .svg" in bad.stderr


def test_plot_csv_matches_the_server(module_server: ServerHandle) -> None:
    info = trained(module_server, "plot-csv", 50)
    result = rnnserve(module_server, "plot", "plot-csv", "--format", "csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["step", "loss", "smoothed"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 51))
    # The last raw and smoothed loss are the ones GetSession reports.
    assert float(rows[-1][1]) == pytest.approx(info.loss, rel=1e-12)
    assert float(rows[-1][2]) == pytest.approx(info.smoothed_loss, rel=1e-9)
    with module_server.client() as client:
        points = client.session("plot-csv").watch_loss(1)
        first = [next(iter(points)) for _ in range(1)]
        points.cancel()
    assert float(rows[1][1]) == pytest.approx(first[0].loss, rel=1e-12)
    # An untrained session: the header only.
    with module_server.client() as client:
        client.create_session(TEXT, session_id="plot-empty", hidden_size=8)
    empty = rnnserve(module_server, "plot", "plot-empty", "--format", "csv")
    assert empty.returncode == 0 and empty.stdout == "step,loss,smoothed\n"


def test_plot_draws_in_a_terminal(module_server: ServerHandle) -> None:
    trained(module_server, "plot-tty", 40)
    term = Pty(module_server, "plot", "plot-tty", cols=90, rows=25)
    try:
        output = term.read_to_end()
    finally:
        term.close()
    assert term.process.returncode == 0, output
    plain = ANSI.sub("", output)
    assert "plot-tty: step 40, loss" in plain
    assert "smoothed loss" in plain and "step" in plain
    assert sum(1 for ch in plain if 0x2800 < ord(ch) <= 0x28FF) > 30  # the braille curves
    lines = [line for line in plain.splitlines() if line.strip()]
    assert 15 <= len(lines) <= 25  # fits the 25-row terminal
    assert max(len(line) for line in lines) <= 90
    assert "\x1b[" in output  # coloured on a terminal


def test_watch_plot_redraws_live(module_server: ServerHandle) -> None:
    trained(module_server, "plot-live", 5)
    term = Pty(module_server, "watch", "plot-live", "--plot", "--interval", "0.2")
    try:
        term.read_until(lambda t: "plot-live: step 5," in ANSI.sub("", t))
        with module_server.client() as client:
            client.session("plot-live").train(30, report_every=10).wait()
        term.read_until(lambda t: "plot-live: step 35," in ANSI.sub("", t))
        term.process.send_signal(signal.SIGINT)
        term.read_to_end()
    finally:
        term.close()
    assert term.process.returncode == 130
    assert term.output.count(b"\x1b[H\x1b[2J") >= 2  # cleared and redrawn


# ---------------------------------------------------------------------------------------------
# watch's status line (issue 9 item 14)


def test_watch_shows_step_loss_and_idle(module_server: ServerHandle) -> None:
    with module_server.client() as client:
        session = client.create_session(TEXT, session_id="watch-status", hidden_size=16, seed=1)
        session.train(3).wait()
    term = Pty(module_server, "watch", "watch-status", "--interval", "0.2")
    try:
        # Before anyone trains: the session's own step, and that it is idle.
        term.read_until(lambda t: "watch-status: idle at step 3  loss " in t)
        with Client(module_server.address) as client:
            stream = client.session("watch-status").train(1_000_000, report_every=1)
            steps: list[int] = []
            reader = threading.Thread(target=lambda: steps.extend(p.step for p in stream))
            reader.start()
            term.read_until(lambda t: re.search(r"training  step \d+  loss \d", t) is not None)
            stream.cancel()
            reader.join(30)
            # The status comes from GetSession, so it is the session's step, not a count of
            # points received (the watcher started after step 3).
            info = client.session("watch-status").info()
            deadline = time.monotonic() + 30
            while info.state == pb.SESSION_STATE_TRAINING and time.monotonic() < deadline:
                info = client.session("watch-status").info()
        assert steps and steps[0] > 3
        mark = len(term.output)
        term.read_until(lambda t: f"idle at step {info.step}  loss" in t[mark:])
        term.process.send_signal(signal.SIGINT)
        output = term.read_to_end()
    finally:
        term.close()
    assert term.process.returncode == 130
    # The last thing on the terminal erases the status line: nothing stale is left.
    tail = output.rstrip("\r\n")
    assert tail.endswith("\r\x1b[K"), repr(output[-200:])


def test_watch_without_terminal_prints_points(module_server: ServerHandle) -> None:
    trained(module_server, "watch-lines", 12)
    result = rnnserve(module_server, "watch", "watch-lines", "--from-step", "1", "--count", "12")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [int(line.split()[0]) for line in lines] == list(range(1, 13))
    assert "\r" not in result.stderr


# ---------------------------------------------------------------------------------------------
# list, did-you-mean, delete


def test_list_table_and_empty(server: ServerHandle) -> None:
    empty = rnnserve(server, "list")
    assert empty.returncode == 0
    assert empty.stdout.startswith("no sessions")
    with server.client() as client:
        client.create_session(TEXT, session_id="table-a", hidden_size=16, seed=1).train(7).wait()
        client.create_session(TEXT, session_id="table-b", preset="notebook")
    result = rnnserve(server, "list")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split() == [
        "ID", "STATE", "CELL", "LAYERS", "HIDDEN", "OPTIMIZER", "STEP", "LOSS", "VAL_LOSS",
        "CHARS/S", "CREATED", "CHECKPOINTED",
    ]  # fmt: skip
    a = rows[0].split()
    assert a[:8] == ["table-a", "ready", "gru", "2", "16", "adam", "7", a[7]]  # default: 2 x GRU
    assert float(a[7]) > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", a[10]) and re.fullmatch(r"\d\d:\d\d", a[11])
    assert a[12] == "7"  # checkpointed step: Train checkpoints before its final message
    b = rows[1].split()
    assert b[:8] == ["table-b", "ready", "rnn", "1", "100", "sgd", "0", "-"]


def test_did_you_mean_on_not_found(module_server: ServerHandle) -> None:
    with module_server.client() as client:
        client.create_session(TEXT, session_id="shakespeare", hidden_size=8)
    result = rnnserve(module_server, "show", "shakespear")
    assert result.returncode == 3
    assert result.stderr.rstrip().endswith("(did you mean 'shakespeare'?)"), result.stderr
    far = rnnserve(module_server, "show", "zzzzqqq")
    assert far.returncode == 3 and "did you mean" not in far.stderr
    delete = rnnserve(module_server, "delete", "shakespere")
    assert delete.returncode == 3 and "did you mean 'shakespeare'?" in delete.stderr


def _training(server: ServerHandle, session_id: str) -> tuple[Client, object, threading.Thread]:
    """A session in the middle of a long Train run on a thread; returns (client, stream, t)."""
    client = server.client()
    session = client.create_session(TEXT, session_id=session_id, hidden_size=16, seed=1)
    stream = session.train(1_000_000, report_every=1)
    first = threading.Event()
    finals: list[pb.TrainResponse] = []

    def run() -> None:
        for progress in stream:
            first.set()
            if progress.stop_reason:
                finals.append(progress)
        first.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert first.wait(30)
    thread.finals = finals  # type: ignore[attr-defined]
    return client, stream, thread


def test_delete_asks_when_training(module_server: ServerHandle) -> None:
    client, stream, thread = _training(module_server, "del-busy")
    try:
        # No terminal and no --yes: refused, with what to do.
        refused = rnnserve(module_server, "delete", "del-busy")
        assert refused.returncode == 4
        assert "is training" in refused.stderr and "--yes" in refused.stderr
        assert client.session("del-busy").info().step > 0
        # On a terminal: asked; "n" keeps it.
        term = Pty(module_server, "delete", "del-busy")
        try:
            term.read_until(lambda t: "Delete it anyway? [y/N]" in t)
            term.write("n\n")
            term.read_to_end()
        finally:
            term.close()
        assert term.process.returncode == 4
        assert "kept del-busy" in term.text
        assert client.session("del-busy").info().state == pb.SESSION_STATE_TRAINING
        # "y" deletes it; the Train stream ends with DELETED.
        term = Pty(module_server, "delete", "del-busy")
        try:
            term.read_until(lambda t: "[y/N]" in t)
            term.write("y\n")
            term.read_to_end()
        finally:
            term.close()
        assert term.process.returncode == 0, term.text
        assert "deleted del-busy" in term.text
        thread.join(30)
        assert [f.stop_reason for f in thread.finals] == [pb.STOP_REASON_DELETED]  # type: ignore[attr-defined]
    finally:
        stream.cancel()  # type: ignore[attr-defined]
        client.close()


def test_delete_yes_skips_the_question(module_server: ServerHandle) -> None:
    client, stream, thread = _training(module_server, "del-yes")
    try:
        result = rnnserve(module_server, "delete", "del-yes", "--yes")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "deleted del-yes\n"
        thread.join(30)
        # An idle session is deleted without a question, terminal or not.
        client.create_session(TEXT, session_id="del-idle", hidden_size=8)
        assert rnnserve(module_server, "delete", "del-idle").returncode == 0
    finally:
        stream.cancel()  # type: ignore[attr-defined]
        client.close()


# ---------------------------------------------------------------------------------------------
# completion


def complete(server: ServerHandle | None, *words: str) -> list[str]:
    """What `rnnserve __complete` offers for the last of ``words`` (words[0] is rnnserve)."""
    address = ["--address", server.address] if server is not None else []
    line = ["rnnserve", *address, *words]
    result = subprocess.run(
        [sys.executable, "-m", "rnnserve", "__complete", str(len(line) - 1), *line],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_completion_commands_flags_ids(module_server: ServerHandle) -> None:
    with module_server.client() as client:
        client.create_session(TEXT, session_id="comp-one", hidden_size=8)
        client.create_session(TEXT, session_id="comp-two", hidden_size=8)
    commands = complete(None, "")
    assert {"create", "train", "watch", "plot", "list", "delete", "completion"} <= set(commands)
    assert "--steps" in complete(None, "train", "x", "--")
    assert "--yes" in complete(None, "delete", "--")
    assert "--address" in complete(None, "--")
    assert complete(None, "create", "--optimizer", "") == ["sgd", "adagrad", "adam"] or set(
        complete(None, "create", "--optimizer", "")
    ) >= {"sgd", "adam"}
    assert complete(None, "plot", "x", "--format", "") == ["chart", "csv"]
    ids = complete(module_server, "show", "")
    assert {"comp-one", "comp-two"} <= set(ids)
    assert {"comp-one", "comp-two"} <= set(complete(module_server, "delete", "comp-one", ""))
    assert complete(module_server, "train", "comp-one", "") == []  # one id only
    assert {"comp-two"} <= set(complete(module_server, "show", "comp-one", ""))  # side by side
    assert complete(module_server, "create", "") == []  # a file: the shell completes it
    # A server that doesn't answer: no ids, quickly, no error.
    assert complete(None, "--address", "127.0.0.1:1", "show", "") == []


def test_completion_script_in_bash(module_server: ServerHandle, tmp_path: Path) -> None:
    with module_server.client() as client:
        client.create_session(TEXT, session_id="bash-ids", hidden_size=8)
    script = rnnserve(None, "completion", "bash")
    assert script.returncode == 0 and "complete -o default" in script.stdout
    # A `rnnserve` on PATH, as the console script would be.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "rnnserve"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m rnnserve "$@"\n')
    wrapper.chmod(0o755)
    test = f"""
eval "$(rnnserve completion bash)"
ask() {{ COMP_WORDS=("$@"); COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 )); _rnnserve_complete;
        printf '%s\\n' "${{COMPREPLY[@]}}"; echo ---; }}
ask rnnserve pl
ask rnnserve --address {module_server.address} show bash-
ask rnnserve train x --st
"""
    result = subprocess.run(
        ["bash", "-c", test],
        capture_output=True,
        text=True,
        timeout=60,
        env={**cli_env(), "PATH": f"{bindir}:{os.environ['PATH']}"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answers = [block.split() for block in result.stdout.split("---")[:3]]
    assert answers == [["plot"], ["bash-ids"], ["--steps"]]


# ---------------------------------------------------------------------------------------------
# README walk-through fixes (issue 12 item 5)


def test_append_missing_file_is_a_usage_error(module_server: ServerHandle) -> None:
    with module_server.client() as client:
        client.create_session(TEXT, session_id="append-missing", hidden_size=8)
    result = rnnserve(module_server, "append", "append-missing", "no-such-file.txt")
    assert result.returncode == 2
    assert "no-such-file.txt: no such file" in result.stderr
    create = rnnserve(module_server, "create", "no-such-file.txt")
    assert create.returncode == 2 and "no such file" in create.stderr


def test_generate_prints_the_prime_first(module_server: ServerHandle) -> None:
    trained(module_server, "gen-prime", 5)
    result = rnnserve(
        module_server, "generate", "gen-prime", "--prime", "The quick", "--length", "30"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The quick")
    assert len(result.stdout) == len("The quick") + 30


def test_ctrl_c_reports_the_step_list_shows(module_server: ServerHandle) -> None:
    with module_server.client() as client:
        client.create_session(TEXT, session_id="sigint-step", hidden_size=64, seed=1)
    train = train_in_background(module_server, "sigint-step")
    try:
        assert train.stdout is not None
        train.stdout.readline()  # training has started
        train.send_signal(signal.SIGINT)
        _, err = train.communicate(timeout=60)
    finally:
        train.kill()
    assert train.returncode == 130, err
    said = int(re.search(r"the session is at step (\d+)", err).group(1))  # type: ignore[union-attr]
    listed = rnnserve(module_server, "--json", "list")
    import json

    steps = {s["session_id"]: s["step"] for s in map(json.loads, listed.stdout.splitlines())}
    assert steps["sigint-step"] == said


def test_watch_plot_piped_draws_once(module_server: ServerHandle) -> None:
    trained(module_server, "plot-piped", 8)
    result = rnnserve(module_server, "watch", "plot-piped", "--plot", "--count", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("plot-piped: step 8,") == 1
    assert "\x1b" not in result.stdout  # no screen clearing or colours into a pipe


def test_client_address_from_the_environment(
    module_server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The README's Library snippet says Client(): it must reach the server the CLI reaches.
    monkeypatch.setenv("RNNSERVE_ADDRESS", module_server.address)
    with Client() as client:
        assert client.address == module_server.address
        assert client.health() == "SERVING"
    monkeypatch.delenv("RNNSERVE_ADDRESS")
    with Client() as client:
        assert client.address == "localhost:50051"


def slow_session(server: ServerHandle, session_id: str) -> None:
    """A session whose every update is followed by a validation pass of seconds (hidden 512,
    90,000 characters held out), as on a big model with a validation split."""
    with server.client() as client:
        client.create_session(
            TEXT * 100,
            session_id=session_id,
            hidden_size=512,
            num_layers=1,  # the one-layer GRU these tests' timings were written for
            batch_size=1,
            seq_length=10,
            validation_fraction=0.5,
            seed=1,
        )


def test_a_second_ctrl_c_while_the_server_finishes_still_says_the_step(
    module_server: ServerHandle,
) -> None:
    # Issue 16 item 18: after Ctrl-C the CLI waits for the server to finish the update in
    # progress; with a validation pass after every update that wait is long, and a second
    # Ctrl-C during it printed "rnnserve: interrupted" with no step.
    slow_session(module_server, "sigint-twice")
    train = train_in_background(
        module_server, "sigint-twice", "--report-every", "1000", "--eval-every", "1"
    )
    try:
        # Ctrl-C once the second update runs: step 1's loss point means its update and
        # validation pass are done.
        with module_server.client() as client, client.session("sigint-twice").watch_loss(1) as live:
            next(iter(live))
        mark = len(module_server.logs)
        train.send_signal(signal.SIGINT)
        # The CLI has cancelled and polls the server until the session stops training: once
        # it has had an answer (its second GetSession went out), Ctrl-C again.
        for _ in range(2):
            event = module_server.wait_for_log(
                "rpc",
                start=mark,
                method="/rnnserve.v1.RnnService/GetSession",
                session_id="sigint-twice",
                timeout=15,
            )
            mark = module_server.logs.index(event) + 1
        train.send_signal(signal.SIGINT)
        _, err = train.communicate(timeout=60)
    except AssertionError as e:  # the CLI never asked: say what it printed
        train.kill()
        raise AssertionError(f"{e}\n--- the CLI's stderr ---\n{train.communicate()[1]}") from None
    finally:
        train.kill()
    assert train.returncode == 130, err
    last = err.splitlines()[-1]
    assert re.match(r"rnnserve: cancelled; the session is at step \d+, ", last), err
    assert "still finishing" in last, err


def test_ctrl_c_as_training_starts_says_the_step(module_server: ServerHandle) -> None:
    # Issue 16 item 18: a Ctrl-C while the CLI was still setting up the Train call (the
    # server has it already) printed "rnnserve: interrupted" with no step; one that landed
    # inside gRPC's setup could leave the CLI hanging at exit.
    slow_session(module_server, "sigint-start")
    train = train_in_background(module_server, "sigint-start")
    try:
        module_server.wait_for_log("train_started", session_id="sigint-start")
        train.send_signal(signal.SIGINT)
        _, err = train.communicate(timeout=60)
    finally:
        train.kill()
    assert train.returncode == 130, err
    assert re.match(r"rnnserve: cancelled; the session is at step \d+", err.splitlines()[-1]), err


# ---------------------------------------------------------------------------------------------
# Exit codes against docs/client.md's table (issue 16 item 16)


@pytest.mark.parametrize("command", ["create", "append", "import"])
def test_a_directory_as_input_is_a_usage_error(
    module_server: ServerHandle, tmp_path: Path, command: str
) -> None:
    session_id = f"exit-dir-{command}"
    with module_server.client() as client:
        client.create_session(TEXT, session_id=session_id, hidden_size=8)
    args = [command, session_id] if command == "append" else [command]
    result = rnnserve(module_server, *args, str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert f"{tmp_path}: is a directory" in result.stderr.replace("Is a", "is a"), result.stderr


def test_a_file_that_is_not_utf8_is_named_and_a_usage_error(
    module_server: ServerHandle, tmp_path: Path
) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Café au lait, s'il vous plaît.\n".encode("latin-1") * 20)
    with module_server.client() as client:
        client.create_session(TEXT, session_id="exit-latin1", hidden_size=8)
    for args in (["create", str(latin1)], ["append", "exit-latin1", str(latin1)]):
        result = rnnserve(module_server, *args)
        assert result.returncode == 2, result.stderr
        assert f"{latin1}: not UTF-8 text" in result.stderr, result.stderr
    # The same bytes on stdin: named as stdin, and no traceback (the locale's surrogate
    # escapes used to reach the request and fail there).
    piped = subprocess.run(
        [sys.executable, "-m", "rnnserve", "--address", module_server.address, "create"],
        input=latin1.read_bytes(),
        capture_output=True,
        timeout=60,
        env={**cli_env(), "LC_ALL": "C"},
        check=False,
    )
    assert piped.returncode == 2, piped.stderr
    assert b"stdin: not UTF-8 text" in piped.stderr and b"Traceback" not in piped.stderr
    with module_server.client() as client:
        assert client.session("exit-latin1").info().corpus_chars == len(TEXT)


def test_empty_input_is_no_input_text(module_server: ServerHandle, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with module_server.client() as client:
        client.create_session(TEXT, session_id="exit-empty", hidden_size=8)
    for args, stdin in (
        (["create", str(empty)], None),
        (["create", "--text", ""], None),
        (["create"], ""),
        (["append", "exit-empty", str(empty)], None),  # e.g. a download that failed
    ):
        result = rnnserve(module_server, *args, stdin=stdin)
        assert result.returncode == 2, (args, result.stderr)
        assert "no input text" in result.stderr, (args, result.stderr)


def test_no_server_says_the_address_as_typed_and_how_to_start_one() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"localhost:{port}"  # resolves to ::1 too: gRPC would say ipv6:%5B::1%5D:PORT
    for args in (["list"], ["health"], ["health", "--wait", "0.5"]):
        result = rnnserve(None, "--address", address, *args)
        assert result.returncode == 5, result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert f"the server at {address}" in result.stderr, result.stderr
        assert "ipv4:" not in result.stderr and "ipv6:" not in result.stderr, result.stderr
        assert "`make run`" in result.stderr, result.stderr
        assert f"`rnnserve-server --address {address}`" in result.stderr, result.stderr
