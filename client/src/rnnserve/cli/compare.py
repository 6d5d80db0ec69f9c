"""``plot``, ``watch`` and ``show`` for one session or several side by side (issue 20: compare
runs). One session keeps its own view (every series in ``plot``, the status line in
``watch``); several get one chart with a line per session, one live line per session, one
column per session."""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

from rnnserve import plot
from rnnserve.cli.commands import cmd_show as cmd_show_one
from rnnserve.cli.exit_codes import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, PROG, UsageError
from rnnserve.cli.listing import _created
from rnnserve.cli.output import Output, _config_fields, _state, message_to_dict
from rnnserve.cli.training import _CtrlC, _on_ctrl_c
from rnnserve.client import Client
from rnnserve.errors import RnnServeError
from rnnserve.v1 import rnn_service_pb2 as pb


def _unique(ids: list[str]) -> list[str]:
    """The ids in the order given, each once."""
    return list(dict.fromkeys(ids))


def _chart_title(session_id: str, history: plot.LossHistory) -> str:
    if not len(history):
        return f"{session_id}: no updates yet"
    smoothed = history.columns["smoothed"][-1]
    return (
        f"{session_id}: step {history.steps[-1]}, loss {history.columns['loss'][-1]:.4f}"
        f" (smoothed {smoothed:.4f})"
    )


def _compare_title(histories: dict[str, plot.LossHistory]) -> str:
    """'A: step 120, 2.1034 | B: no updates yet' (smoothed loss)."""
    parts = []
    for session_id, history in histories.items():
        if len(history):
            smoothed = history.columns["smoothed"][-1]
            parts.append(f"{session_id}: step {history.steps[-1]}, {smoothed:.4f}")
        else:
            parts.append(f"{session_id}: no updates yet")
    return " | ".join(parts) + " (smoothed loss)"


def _chart(
    histories: dict[str, plot.LossHistory],
) -> tuple[plot.LossHistory | list[plot.Line], str]:
    """One session: its whole history and its title; several: their lines and a title."""
    if len(histories) == 1:
        ((session_id, history),) = histories.items()
        return history, _chart_title(session_id, history)
    return plot.compare_lines(histories), _compare_title(histories)


# ---------------------------------------------------------------------------------------------
# plot


def cmd_plot(client: Client, args: argparse.Namespace, out: Output) -> int:
    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() not in plot.IMAGE_SUFFIXES:
        raise UsageError(f"--output must end in .png or .svg, not {output.name!r}")
    histories: dict[str, plot.LossHistory] = {}
    for session_id in _unique(args.ids):
        histories[session_id] = history = plot.LossHistory()
        history.extend(client.session(session_id).loss_history(args.from_step))
    chart, title = _chart(histories)
    several = len(histories) > 1
    if args.format == "csv":
        plot.write_csv(histories if several else next(iter(histories.values())), out.stream)
        out.stream.flush()
    elif output is None:
        if out.json:
            for session_id, history in histories.items():
                for i, step in enumerate(history.steps):
                    values = {k: v[i] for k, v in history.columns.items()}
                    out.obj({"session_id": session_id, "step": step, **values})
        else:
            width, height = _chart_size(args)
            out.line(plot.terminal_chart(chart, title, width, height, color=out.stream.isatty()))
    if output is not None:
        try:
            plot.save_image(chart, title, output)
        except ImportError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return EXIT_ERROR
        if args.format != "csv":
            counts = {session_id: len(h) for session_id, h in histories.items()}
            if several:
                out.obj({"output": str(output), "points": counts})
            else:
                ((session_id, count),) = counts.items()
                out.obj({"session_id": session_id, "output": str(output), "points": count})
            steps = ", ".join(_steps(i, n, several) for i, n in counts.items())
            out.line(f"wrote {output} ({steps})")
    return EXIT_OK


def _steps(session_id: str, count: int, several: bool) -> str:
    return f"{session_id}: {count} steps" if several else f"{count} steps"


# ---------------------------------------------------------------------------------------------
# watch


class _StatusLine:
    """A session's step, loss and state from GetSession, as one line of text."""

    def __init__(self, session: Any, session_id: str) -> None:
        self.session = session
        self.id = session_id
        self._rate: tuple[float, int] | None = None  # (time, step) of the last poll
        self.steps_per_second = 0.0

    def text(self) -> str:
        try:
            info: pb.Session = self.session.info(timeout=5.0)
        except RnnServeError as e:
            return f"{self.id}: no answer from the server ({e.details})"
        now = time.monotonic()
        if self._rate is not None and now > self._rate[0]:
            self.steps_per_second = (info.step - self._rate[1]) / (now - self._rate[0])
        self._rate = (now, info.step)
        where = f"step {info.step}  loss {info.loss:.4f}  smoothed {info.smoothed_loss:.4f}"
        if info.state == pb.SESSION_STATE_TRAINING:
            return f"{self.id}: training  {where}  {self.steps_per_second:,.1f} steps/s"
        if info.step == 0:
            return f"{self.id}: idle, not trained yet; waiting for updates (Ctrl-C stops)"
        return f"{self.id}: idle at {where}; waiting for updates (Ctrl-C stops)"


class _StatusBlock:
    """One status line per session, redrawn in place on stderr."""

    def __init__(self, lines: list[_StatusLine]) -> None:
        self.lines = lines
        self.shown = False

    def _up(self) -> str:
        """From the block's last line (where the cursor stays) back to its first."""
        return f"\x1b[{len(self.lines) - 1}A" if len(self.lines) > 1 else ""

    def draw(self) -> None:
        width = shutil.get_terminal_size((80, 24)).columns
        texts = [line.text()[: max(width - 1, 10)] for line in self.lines]
        up = self._up() if self.shown else ""
        sys.stderr.write(up + "\r" + "\n".join("\x1b[K" + text for text in texts))
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            # Erase the line, or everything from the block's first line down.
            sys.stderr.write(self._up() + ("\r\x1b[J" if len(self.lines) > 1 else "\r\x1b[K"))
            sys.stderr.flush()
            self.shown = False


class _Followers:
    """The WatchLoss streams of one or more sessions, each read on its own thread, waited on
    together (so the caller can also redraw on a timer). ``limit`` ends a session's stream
    after that many points; ``ctrl_c`` pressed ends a wait at once."""

    def __init__(self, streams: dict[str, Any], limit: int | None, ctrl_c: _CtrlC) -> None:
        self.cond = ctrl_c.cond
        self.ctrl_c = ctrl_c
        self.streams = streams
        self.points: dict[str, list[pb.LossPoint]] = {i: [] for i in streams}
        self.seen = dict.fromkeys(streams, 0)
        self.errors: dict[str, RnnServeError] = {}
        self.ended: set[str] = set()
        self.limit = limit
        for session_id, stream in streams.items():
            threading.Thread(target=self._read, args=(session_id, stream), daemon=True).start()

    def _read(self, session_id: str, stream: Any) -> None:
        try:
            for point in stream:
                with self.cond:
                    self.points[session_id].append(point)
                    self.cond.notify_all()
        except RnnServeError as e:
            with self.cond:
                self.errors[session_id] = e
        finally:
            with self.cond:
                self.ended.add(session_id)
                self.cond.notify_all()

    def _available(self, session_id: str) -> int:
        """How many of the session's points there are to take (at most ``limit``)."""
        have = len(self.points[session_id])
        return have if self.limit is None else min(have, self.limit)

    def _done(self, session_id: str) -> bool:
        taken = self.seen[session_id]
        return (self.limit is not None and taken >= self.limit) or (
            session_id in self.ended and self._available(session_id) <= taken
        )

    def finished(self) -> bool:
        """Every stream has ended (or given ``limit`` points) and every point was taken."""
        with self.cond:
            return all(self._done(i) for i in self.streams)

    def wait(self, timeout: float) -> dict[str, list[pb.LossPoint]]:
        """Each session's new points, waiting up to ``timeout`` for one; a stream's error is
        raised."""
        with self.cond:
            self.cond.wait_for(
                lambda: (
                    self.ctrl_c.pressed
                    or bool(self.errors)
                    or any(self._available(i) > self.seen[i] for i in self.streams)
                ),
                timeout,
            )
            for error in self.errors.values():
                raise error
            news: dict[str, list[pb.LossPoint]] = {}
            for session_id in self.streams:
                end = self._available(session_id)
                news[session_id] = self.points[session_id][self.seen[session_id] : end]
                self.seen[session_id] = max(end, self.seen[session_id])
            return news

    def cancel(self) -> None:
        for stream in self.streams.values():
            stream.cancel()


def cmd_watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    ids = _unique(args.ids)
    several = len(ids) > 1
    sessions = {session_id: client.session(session_id) for session_id in ids}
    ctrl_c = _CtrlC()
    # Ctrl-C ends the loop between two calls, never inside one (see _on_ctrl_c).
    with _on_ctrl_c(ctrl_c.press):
        starts: dict[str, int] = {}
        for session_id, session in sessions.items():
            # Without --from-step, follow from the next update (--plot: the whole history).
            if args.from_step is not None:
                starts[session_id] = args.from_step
            else:
                starts[session_id] = 1 if args.plot else session.info().step + 1
        streams = {
            session_id: s.watch_loss(starts[session_id]) for session_id, s in sessions.items()
        }
        followers = _Followers(streams, args.count, ctrl_c)
        # The live status lines: on a terminal, not with --json / --no-progress / --plot.
        block = (
            _StatusBlock([_StatusLine(s, session_id) for session_id, s in sessions.items()])
            if not (out.json or args.no_progress or args.plot) and sys.stderr.isatty()
            else None
        )
        histories = {session_id: plot.LossHistory() for session_id in ids}
        last: dict[str, pb.LossPoint] = {}
        redraw_at = 0.0
        try:
            while not ctrl_c.pressed:
                for session_id, points in followers.wait(args.interval).items():
                    for point in points:
                        if several:  # each point says whose it is
                            out.obj({"session_id": session_id, **message_to_dict(point)})
                        else:
                            out.obj(point)
                        if block is None and not args.plot:
                            named = f"{session_id} " if several else ""
                            out.line(f"{named}{point.step} {point.loss:.6f}")
                        last[session_id] = point
                    histories[session_id].extend(points)
                if followers.finished():
                    break
                now = time.monotonic()
                if now >= redraw_at and not ctrl_c.pressed:
                    redraw_at = now + args.interval
                    if block is not None:
                        block.draw()
                    if args.plot and not out.json and sys.stdout.isatty():
                        _draw_live(histories, args)  # piped: drawn once, at the end
        finally:
            followers.cancel()
            if block is not None:
                block.clear()
    if ctrl_c.pressed:
        return EXIT_INTERRUPTED
    if args.plot and not out.json:
        _draw_live(histories, args)
    if block is not None:
        for session_id, point in last.items():
            named = f"{session_id}: " if several else ""
            out.line(f"last: {named}step {point.step} loss {point.loss:.6f}")
    return EXIT_OK


def _chart_size(args: argparse.Namespace) -> tuple[int, int]:
    size = shutil.get_terminal_size((100, 30))
    width = args.width if args.width else size.columns
    height = args.height if args.height else max(size.lines - 2, 10)
    return width, height


def _draw_live(histories: dict[str, plot.LossHistory], args: argparse.Namespace) -> None:
    """Clear the terminal and draw the compared chart (plain redraw when not a terminal)."""
    tty = sys.stdout.isatty()
    width, height = _chart_size(args)
    chart, title = _chart(histories)
    text = plot.terminal_chart(chart, title, width, height, color=tty)
    sys.stdout.write(("\x1b[H\x1b[2J" if tty else "") + text + "\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# show


def _compact_rows(s: pb.Session) -> list[tuple[str, str]]:
    """A session as short (key, value) rows that line up beside another's: progress, then
    every config field on its own row."""
    rows = [
        ("state", _state(s)),
        ("step", str(s.step)),
        ("loss", f"{s.loss:.4f}" if s.step else "-"),
        ("smoothed", f"{s.smoothed_loss:.4f}" if s.step else "-"),
        (
            "validation",
            f"{s.validation_loss:.4f} at {s.validation_step}"
            if s.HasField("validation_loss")
            else "-",
        ),
        ("chars/s", f"{s.chars_per_second:,.0f}" if s.HasField("chars_per_second") else "-"),
        ("corpus", f"{s.corpus_chars:,} chars"),
        ("alphabet", f"{len(s.alphabet)} chars"),
        ("parameters", f"{s.parameter_count:,}"),
        *(_config_fields(s.config) if s.config.hidden_size else []),  # BROKEN: no config
        ("created", _created(s)),
        ("checkpointed", str(s.checkpointed_step)),
    ]
    if s.error:
        rows.append(("error", s.error))
    return rows


def cmd_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    ids = _unique(args.ids)
    if len(ids) == 1:
        args.id = ids[0]
        return cmd_show_one(client, args, out)
    infos = [client.session(session_id).info() for session_id in ids]
    for info in infos:
        out.obj(info)
    columns = [dict(_compact_rows(info)) for info in infos]
    keys = list(dict.fromkeys(k for c in columns for k in c))  # "error" only where there is one
    # A row whose values differ between the sessions is marked with "*".
    table = [
        [("* " if len({c.get(k, "-") for c in columns}) > 1 else "  ") + k]
        + [c.get(k, "-") for c in columns]
        for k in keys
    ]
    header = ["", *ids]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        out.line("  ".join(text.ljust(widths[i]) for i, text in enumerate(row)).rstrip())
    return EXIT_OK
