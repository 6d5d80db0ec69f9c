"""``train``: many updates with a progress bar, stop conditions and a clean Ctrl-C. (``watch``
and ``plot`` are in :mod:`rnnserve.cli.compare`.)"""

from __future__ import annotations

import argparse
import os
import sys
import threading
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
