"""``train``: many updates with a progress bar, stop conditions and a clean Ctrl-C. (``watch``
and ``plot`` are in :mod:`rnnserve.cli.compare`.)"""

from __future__ import annotations

import argparse
import os
import sys
import time
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
from rnnserve.client import Client
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
    start = session.info().step
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
    try:
        if args.until_step is None:
            final = _train_once(session, args.steps, args.max_seconds, view, options)
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
        _report_cancelled(session, view.last, "cancelled")
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
        _report_cancelled(session, view.last, f"stopped after --max-seconds {args.max_seconds:g}")
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
) -> pb.TrainResponse | None:
    """One Train of ``steps`` (not retried: without --until-step a retry could train twice);
    its final message, or None once ``max_seconds`` have passed (the deadline stops it)."""
    try:
        stream = session.train(steps, timeout=max_seconds, **options)
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


def _report_cancelled(session: Any, last: pb.TrainResponse | None, why: str) -> None:
    """After a cancel: say where training stopped (asking the server, if it answers)."""
    step: int | None = last.step if last is not None else None
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
