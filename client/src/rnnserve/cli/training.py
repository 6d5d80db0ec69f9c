"""``train``, ``watch`` and ``plot``: the commands that follow a session's progress (progress
bar, status line, loss charts)."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rnnserve import plot
from rnnserve.cli.exit_codes import (
    EXIT_DIVERGED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    PROG,
    UsageError,
)
from rnnserve.cli.output import Output, _enum_name
from rnnserve.client import Client, TrainStream
from rnnserve.errors import ConnectionLost, RnnServeError, Timeout
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


class _TrainView:
    """What ``train`` shows: the progress bar (or a line per report), samples, and a line when
    a cut-off call is retried."""

    def __init__(self, args: argparse.Namespace, out: Output, start: int, target: int) -> None:
        self.out = out
        self.start = start
        self.target = target
        self.last: pb.TrainResponse | None = None
        self.retrying = False
        self.bar = tqdm(
            total=max(0, target - start),
            unit="step",
            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
            "[{elapsed}<{remaining}{postfix}]",
            desc=args.id,
            file=sys.stderr,
            **_bar_width(),
            # None: tqdm shows the bar only on a terminal.
            disable=True if (out.json or args.no_progress) else None,
        )

    def show(self, progress: pb.TrainResponse) -> None:
        """One Train message."""
        self.last = progress
        self.retrying = False
        self.out.obj(progress)
        bar = self.bar
        bar.update(max(0, progress.step - self.start) - bar.n)  # back too, after a rollback
        validation = (
            f" val {progress.validation_loss:.3f}" if progress.HasField("validation_loss") else ""
        )
        bar.set_postfix_str(
            f"loss {progress.loss:.3f} (avg {progress.smoothed_loss:.3f}){validation} "
            f"{progress.chars_per_second / 1000:,.1f}k char/s",
            refresh=False,
        )
        if progress.sample and not self.out.json:
            tqdm.write(f"--- sample at step {progress.step} ---\n{progress.sample}")
        if bar.disable and progress.stop_reason == pb.STOP_REASON_UNSPECIFIED:
            self.out.line(_progress_line(progress))

    def retry(self, error: RnnServeError, delay: float) -> None:
        """``train --until-step`` is about to retry a cut-off call (said once per outage)."""
        if not self.retrying:
            self.retrying = True
            tqdm.write(f"{PROG}: {_what(error)}; retrying toward step {self.target}", sys.stderr)


def _what(error: RnnServeError) -> str:
    return error.what if isinstance(error, ConnectionLost) else " ".join(error.details.split())


def cmd_train(client: Client, args: argparse.Namespace, out: Output) -> int:
    session = client.session(args.id)
    start = session.info().step  # said after a Ctrl-C if nothing newer is known
    target = args.until_step if args.until_step is not None else start + args.steps
    view = _TrainView(args, out, start, target)
    options: dict[str, Any] = {
        "report_every": args.report_every,
        "sample_length": args.sample_length,
        "until_loss": args.until_loss,
        "patience": args.patience,
        "eval_every": args.eval_every,
        "sample_temperature": args.sample_temperature,
        "sample_prime": args.sample_prime,
    }
    rollbacks: list[tuple[int, int]] = []
    streams: list[TrainStream] = []  # the plain Train's call, cancelled on Ctrl-C
    try:
        if args.until_step is None:
            final = _train_once(session, args.steps, args.max_seconds, view, options, streams)
        else:  # retried like Session.train_to: the same code
            result = session.train_to(
                args.until_step,
                max_seconds=args.max_seconds,
                on_progress=view.show,
                on_retry=view.retry,
                **options,
            )
            final, rollbacks = (None if result.timed_out else result.final), result.rollbacks
    except KeyboardInterrupt:
        view.bar.close()
        _stop_and_report(session, streams, view.last, "cancelled", start)
        return EXIT_INTERRUPTED
    except ConnectionLost as lost:
        view.bar.close()
        print(
            f"{PROG}: unavailable: {lost.what}; the session may have been updated; rerun with "
            f"--until-step {lost.target_step or target}",
            file=sys.stderr,
        )
        return EXIT_UNAVAILABLE
    finally:
        view.bar.close()
    for seen, restored in rollbacks:
        print(
            f"{PROG}: rolled back: a replica was lost with the session at step {seen}; it "
            f"came back at step {restored} (its last checkpoint), and steps {restored + 1}-"
            f"{seen} were trained again",
            file=sys.stderr,
        )
    if final is None:  # stopped by --max-seconds
        why = f"stopped after --max-seconds {args.max_seconds:g}"
        _stop_and_report(session, streams, view.last, why, start)
        return EXIT_OK
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


def _train_once(
    session: Any,
    steps: int,
    max_seconds: float | None,
    view: _TrainView,
    options: dict[str, Any],
    streams: list[TrainStream],
) -> pb.TrainResponse | None:
    """One Train of ``steps`` (not retried: without --until-step a retry could train twice);
    its final message, or None once ``max_seconds`` have passed (the deadline stops it)."""
    try:
        pressed = threading.Event()
        with _on_ctrl_c(pressed.set):  # held until the call is set up (see _on_ctrl_c)
            stream = session.train(steps, timeout=max_seconds, **options)
        streams.append(stream)
        if pressed.is_set():
            raise KeyboardInterrupt
        for progress in stream:
            view.show(progress)
    except Timeout:
        if max_seconds is None:
            raise
        return None
    final: pb.TrainResponse | None = stream.final
    return final


def _stop_reason(progress: pb.TrainResponse) -> str:
    return _enum_name(pb.StopReason, progress.stop_reason, "STOP_REASON_")


CANCEL_WAIT_SECONDS = 60.0  # most time a cancelled train waits for the server to stop
CANCEL_NOTE_SECONDS = 1.0  # waiting longer than this, the user is told why


@dataclass
class _Where:
    """Where a session whose Train was cancelled is, as far as the server has said."""

    step: int
    answered: bool = False
    training: bool = True


def _stop_and_report(
    session: Any,
    streams: list[TrainStream],
    last: pb.TrainResponse | None,
    why: str,
    start_step: int,
) -> None:
    """Cancel the Train (if one is still open) and say the step training stopped at.

    The server finishes the update (and validation pass) in progress before it sees the
    cancel, which can take seconds on a big model: wait until the session is no longer
    training, so the step said is the one `list` shows. A Ctrl-C meanwhile stops the wait,
    never the report (a second Ctrl-C used to end the CLI with no step)."""
    stop = threading.Event()
    with _on_ctrl_c(stop.set):
        for stream in streams:
            stream.cancel()
        where = _Where(last.step if last is not None else start_step)
        with contextlib.suppress(RnnServeError):
            _wait_until_stopped(session, where, stop)
        if not where.answered:
            said = f"the session was at step {where.step} or later (no answer from the server)"
        elif where.training:
            said = (
                f"the session is at step {where.step}, still finishing the update in "
                f"progress (`{PROG} show {session.id}` shows where it stops)"
            )
        else:
            said = f"the session is at step {where.step}"
        print(f"{PROG}: {why}; {said}", file=sys.stderr)


def _wait_until_stopped(session: Any, where: _Where, stop: threading.Event) -> None:
    """Poll the session until it is not training, ``stop`` is set or CANCEL_WAIT_SECONDS
    pass, keeping ``where`` up to date after every answer."""
    start = time.monotonic()
    noted = False
    while not stop.is_set():
        info = session.info(timeout=5.0)
        where.step, where.answered = info.step, True
        where.training = info.state == pb.SESSION_STATE_TRAINING
        waited = time.monotonic() - start
        if not where.training or waited >= CANCEL_WAIT_SECONDS:
            return
        if waited >= CANCEL_NOTE_SECONDS and not noted:
            print(
                f"{PROG}: waiting for the server to finish the update in progress "
                "(Ctrl-C stops waiting)",
                file=sys.stderr,
            )
            noted = True
        stop.wait(0.05)


@contextlib.contextmanager
def _on_ctrl_c(handler: Callable[[], None]) -> Iterator[None]:
    """Inside the block, Ctrl-C calls ``handler`` instead of raising KeyboardInterrupt.

    A KeyboardInterrupt raised inside gRPC while it sets up a call can leave a call no
    thread finishes, and closing the channel then waits forever; this keeps Ctrl-C out of
    such places. Only the main thread can set a signal handler: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: handler())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Follower:
    """Reads a WatchLoss stream on a thread, so the caller can redraw on a timer."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.points: list[pb.LossPoint] = []
        self.error: RnnServeError | None = None
        self.ended = False
        self.cond = threading.Condition()
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


def cmd_plot(client: Client, args: argparse.Namespace, out: Output) -> int:
    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() not in plot.IMAGE_SUFFIXES:
        raise UsageError(f"--output must end in .png or .svg, not {output.name!r}")
    history = plot.LossHistory()
    history.extend(client.session(args.id).loss_history(args.from_step))
    title = _chart_title(args.id, history)
    if args.format == "csv":
        plot.write_csv(history, out.stream)
        out.stream.flush()
    elif output is None:
        if out.json:
            for i, step in enumerate(history.steps):
                out.obj({"step": step, **{k: v[i] for k, v in history.columns.items()}})
        else:
            tty = out.stream.isatty()
            width, height = _chart_size(args)
            out.line(plot.terminal_chart(history, title, width, height, color=tty))
    if output is not None:
        try:
            plot.save_image(history, title, output)
        except ImportError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return EXIT_ERROR
        if args.format != "csv":
            out.obj({"session_id": args.id, "output": str(output), "points": len(history)})
            out.line(f"wrote {output} ({len(history)} steps)")
    return EXIT_OK
