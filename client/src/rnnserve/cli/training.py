"""``train``: many updates with a progress bar, stop conditions and a clean Ctrl-C. (``watch``
and ``plot`` are in :mod:`rnnserve.cli.compare`.)"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

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
        ctrl_c = _CtrlC()
        with _on_ctrl_c(ctrl_c.press):  # held until the call is set up (see _on_ctrl_c)
            stream = session.train(steps, timeout=max_seconds, **options)
        streams.append(stream)
        if ctrl_c.pressed:
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
    stop = _CtrlC()
    with _on_ctrl_c(stop.press):
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


def _wait_until_stopped(session: Any, where: _Where, stop: _CtrlC) -> None:
    """Poll the session until it is not training, ``stop`` is set or CANCEL_WAIT_SECONDS
    pass, keeping ``where`` up to date after every answer."""
    start = time.monotonic()
    noted = False
    while not stop.pressed:
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
        stop.wait(0.05)  # _CtrlC, not an Event: the handler may run while this waits


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


class _CtrlC:
    """Whether Ctrl-C was pressed, for a loop that waits: ``press`` is the handler to give
    ``_on_ctrl_c``, ``wait`` sleeps until it is pressed. Its lock is reentrant because the
    handler runs in the main thread at any moment, perhaps while that thread holds the lock
    (an Event's plain lock would then wait on itself forever)."""

    def __init__(self, cond: threading.Condition | None = None) -> None:
        self.cond = cond if cond is not None else threading.Condition()  # RLock inside
        self.pressed = False

    def press(self) -> None:
        with self.cond:
            self.pressed = True
            self.cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """True once pressed; waits up to ``timeout`` seconds for it."""
        with self.cond:
            return self.cond.wait_for(lambda: self.pressed, timeout)
