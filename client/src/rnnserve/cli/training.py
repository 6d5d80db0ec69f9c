"""``train`` and ``watch``: the commands that follow a session's progress (progress bar, status
line, live loss chart). ``plot`` and several sessions at once are in :mod:`rnnserve.cli.compare`."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from typing import Any

from tqdm import tqdm

from rnnserve import plot
from rnnserve.cli.exit_codes import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    PROG,
)
from rnnserve.cli.output import Output, _enum_name
from rnnserve.client import Client, TrainStream
from rnnserve.errors import RnnServeError
from rnnserve.v1 import rnn_service_pb2 as pb


def _bar_width() -> dict[str, Any]:
    """tqdm size options: follow the terminal, or 80x24 if it reports 0x0 (some ptys do, and
    tqdm then draws nothing)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        if size.columns > 0 and size.lines > 0:
            return {"dynamic_ncols": True}
    except (OSError, ValueError):
        pass
    return {"ncols": 80, "nrows": 24}


def _progress_line(p: pb.TrainResponse) -> str:
    validation = f"  validation {p.validation_loss:.4f}" if p.HasField("validation_loss") else ""
    return (
        f"step {p.step}  loss {p.loss:.4f}  smoothed {p.smoothed_loss:.4f}{validation}  "
        f"{p.chars_per_second:,.0f} chars/s  {p.elapsed_seconds:.1f} s"
    )


def cmd_train(client: Client, args: argparse.Namespace, out: Output) -> int:
    session = client.session(args.id)
    if args.until_step is None:
        steps = total = args.steps
    else:  # the server counts the steps; the progress bar shows those still to go
        steps, total = 0, max(0, args.until_step - session.info().step)
    stream = session.train(
        steps,
        args.report_every,
        args.sample_length,
        until_step=args.until_step,
        until_loss=args.until_loss,
        patience=args.patience,
        eval_every=args.eval_every,
        sample_temperature=args.sample_temperature,
        sample_prime=args.sample_prime,
    )
    bar = tqdm(
        total=total,
        unit="step",
        bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
        "[{elapsed}<{remaining}{postfix}]",
        desc=args.id,
        file=sys.stderr,
        **_bar_width(),
        # None: tqdm shows the bar only on a terminal.
        disable=True if (out.json or args.no_progress) else None,
    )
    timer: threading.Timer | None = None
    timed_out = threading.Event()
    if args.max_seconds is not None:

        def stop() -> None:
            timed_out.set()
            stream.cancel()

        timer = threading.Timer(args.max_seconds, stop)
        timer.daemon = True
        timer.start()
    done = 0
    try:
        for progress in stream:
            out.obj(progress)
            bar.update(progress.steps_done - done)
            done = progress.steps_done
            validation = (
                f" val {progress.validation_loss:.3f}"
                if progress.HasField("validation_loss")
                else ""
            )
            bar.set_postfix_str(
                f"loss {progress.loss:.3f} (avg {progress.smoothed_loss:.3f}){validation} "
                f"{progress.chars_per_second / 1000:,.1f}k char/s",
                refresh=False,
            )
            if progress.sample and not out.json:
                tqdm.write(f"--- sample at step {progress.step} ---\n{progress.sample}")
            if bar.disable and progress.stop_reason == pb.STOP_REASON_UNSPECIFIED:
                out.line(_progress_line(progress))
    except KeyboardInterrupt:
        stream.cancel()
        bar.close()
        _report_cancelled(session, stream, "cancelled")
        return EXIT_INTERRUPTED
    finally:
        if timer is not None:
            timer.cancel()
        bar.close()
    if stream.final is None:
        if timed_out.is_set():
            _report_cancelled(session, stream, f"stopped after --max-seconds {args.max_seconds:g}")
            return EXIT_OK
        raise RnnServeError("the Train stream ended without a final message")
    final = stream.final
    out.line(f"{_progress_line(final)}  [{_stop_reason(final)}]")
    if final.stop_reason == pb.STOP_REASON_SHUTDOWN:
        print(
            f"{PROG}: unavailable: the server is shutting down; training stopped at step "
            f"{final.step} and the session was checkpointed",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    if final.stop_reason == pb.STOP_REASON_DELETED:
        print(f"{PROG}: not found: session {args.id!r} was deleted while training", file=sys.stderr)
        return EXIT_NOT_FOUND
    if final.stop_reason == pb.STOP_REASON_DIVERGED:
        print(
            f"{PROG}: training diverged: the loss stayed above twice the uniform baseline "
            f"(2 ln V) for a whole report window, so training stopped at step {final.step}; "
            f"lower the learning rate with `{PROG} set {args.id} --learning-rate 1e-3`, or "
            f"try one on a copy with `{PROG} fork {args.id} NEW_ID --learning-rate 1e-3`",
            file=sys.stderr,
        )
        return EXIT_DIVERGED
    return EXIT_OK


def _stop_reason(progress: pb.TrainResponse) -> str:
    return _enum_name(pb.StopReason, progress.stop_reason, "STOP_REASON_")


def _report_cancelled(session: Any, stream: TrainStream, why: str) -> None:
    """After a cancel: say where training stopped (asking the server, if it answers)."""
    step: int | None = stream.last.step if stream.last is not None else None
    try:
        # The server applies the update in progress before it sees the cancel: wait (up to
        # 10 s) until it is no longer training, so the step said is the one `list` shows.
        deadline = time.monotonic() + 10.0
        info = session.info(timeout=5.0)
        while info.state == pb.SESSION_STATE_TRAINING and time.monotonic() < deadline:
            time.sleep(0.05)
            info = session.info(timeout=5.0)
        step = info.step
    except RnnServeError:
        pass
    where = f"; the session is at step {step}" if step is not None else ""
    print(f"{PROG}: {why}{where}", file=sys.stderr)


class _Follower:
    """Reads a WatchLoss stream on a thread, so the caller can redraw on a timer."""

    def __init__(self, stream: Any, cond: threading.Condition | None = None) -> None:
        self.stream = stream
        self.points: list[pb.LossPoint] = []
        self.error: RnnServeError | None = None
        self.ended = False
        self.cond = cond if cond is not None else threading.Condition()  # shared: watch A B
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for point in self.stream:
                with self.cond:
                    self.points.append(point)
                    self.cond.notify_all()
        except RnnServeError as e:
            with self.cond:
                self.error = e
        finally:
            with self.cond:
                self.ended = True
                self.cond.notify_all()

    def wait(self, have: int, timeout: float) -> tuple[list[pb.LossPoint], bool]:
        """Points after the first ``have`` (waiting up to ``timeout`` for one) and whether
        the stream has ended."""
        with self.cond:
            self.cond.wait_for(lambda: len(self.points) > have or self.ended, timeout)
            return self.points[have:], self.ended


class _StatusLine:
    """The session's step, loss and state from GetSession, redrawn in place on stderr."""

    def __init__(self, session: Any, session_id: str) -> None:
        self.session = session
        self.id = session_id
        self.shown = False
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

    def draw(self) -> None:
        text = self.text()
        width = shutil.get_terminal_size((80, 24)).columns
        sys.stderr.write("\r\x1b[K" + text[: max(width - 1, 10)])
        sys.stderr.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self.shown = False


def _chart_size(args: argparse.Namespace, reserve: int = 0) -> tuple[int, int]:
    size = shutil.get_terminal_size((100, 30))
    width = args.width if args.width else size.columns
    height = args.height if args.height else max(size.lines - 2 - reserve, 10)
    return width, height


def cmd_watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    session = client.session(args.id)
    # Without --from-step, follow from the next update (--plot: the whole history).
    if args.from_step is not None:
        from_step = args.from_step
    else:
        from_step = 1 if args.plot else session.info().step + 1
    stream = session.watch_loss(from_step)
    follower = _Follower(stream)
    # The live status line: on a terminal, not with --json / --no-progress / --plot.
    status = (
        _StatusLine(session, args.id)
        if not (out.json or args.no_progress or args.plot) and sys.stderr.isatty()
        else None
    )
    history = plot.LossHistory()
    seen = 0
    last: pb.LossPoint | None = None
    redraw_at = 0.0
    try:
        while True:
            points, ended = follower.wait(seen, args.interval)
            if args.count is not None:
                points = points[: args.count - seen]
            for point in points:
                last = point
                out.obj(point)
                if status is None and not args.plot:
                    out.line(f"{point.step} {point.loss:.6f}")
            seen += len(points)
            history.extend(points)
            done = ended or (args.count is not None and seen >= args.count)
            now = time.monotonic()
            if not done and now >= redraw_at:
                redraw_at = now + args.interval
                if status is not None:
                    status.draw()
                if args.plot and not out.json and sys.stdout.isatty():
                    _draw_live_chart(history, args)  # piped: drawn once, at the end
            if done:
                break
    except KeyboardInterrupt:
        stream.cancel()
        if status is not None:
            status.clear()
        return EXIT_INTERRUPTED
    finally:
        stream.cancel()
    if status is not None:
        status.clear()
    if args.plot and not out.json:
        _draw_live_chart(history, args)
    if follower.error is not None:
        raise follower.error
    if status is not None and last is not None:
        out.line(f"last: step {last.step} loss {last.loss:.6f}")
    return EXIT_OK


def _draw_live_chart(history: plot.LossHistory, args: argparse.Namespace) -> None:
    """Clear the terminal and draw the chart (plain redraw when stdout is not a terminal)."""
    tty = sys.stdout.isatty()
    width, height = _chart_size(args)
    chart = plot.terminal_chart(history, _chart_title(args.id, history), width, height, color=tty)
    sys.stdout.write(("\x1b[H\x1b[2J" if tty else "") + chart + "\n")
    sys.stdout.flush()


def _chart_title(session_id: str, history: plot.LossHistory) -> str:
    if not len(history):
        return f"{session_id}: no updates yet"
    smoothed = history.columns["smoothed"][-1]
    return (
        f"{session_id}: step {history.steps[-1]}, loss {history.columns['loss'][-1]:.4f}"
        f" (smoothed {smoothed:.4f})"
    )
