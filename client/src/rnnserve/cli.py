"""The ``rnnserve`` command: a thin shell over :mod:`rnnserve.client`.

Each command builds a :class:`~rnnserve.Client`, calls one library method, prints the result
(as text, or one JSON object per line with ``--json``) and turns library errors into a
one-line message on stderr and an exit code (see ``EXIT_CODES``).
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import itertools
import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message
from tqdm import tqdm

from rnnserve import __version__, completion, plot
from rnnserve.client import (
    CELLS,
    DEFAULT_ADDRESS,
    DTYPES,
    OPTIMIZERS,
    PRESETS,
    Client,
    TrainStream,
)
from rnnserve.errors import (
    InvalidArgument,
    LimitExceeded,
    PermissionDenied,
    RnnServeError,
    ServerUnavailable,
    SessionBroken,
    SessionBusy,
    SessionExists,
    SessionNotFound,
    Timeout,
    TrainingDiverged,
    Unauthenticated,
)
from rnnserve.v1 import rnn_service_pb2 as pb

PROG = "rnnserve"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_CONFLICT = 4
EXIT_UNAVAILABLE = 5
EXIT_INVALID = 6
EXIT_LIMIT = 7
EXIT_DIVERGED = 8
EXIT_TIMEOUT = 9
EXIT_AUTH = 10
EXIT_BROKEN = 11
EXIT_INTERRUPTED = 130

# (exception type, exit code, label) in match order: subclasses before RnnServeError.
ERRORS: list[tuple[type[RnnServeError], int, str]] = [
    (SessionNotFound, EXIT_NOT_FOUND, "not found"),
    (SessionExists, EXIT_CONFLICT, "already exists"),
    (SessionBusy, EXIT_CONFLICT, "busy"),
    (SessionBroken, EXIT_BROKEN, "broken"),
    (ServerUnavailable, EXIT_UNAVAILABLE, "unavailable"),
    (InvalidArgument, EXIT_INVALID, "invalid argument"),
    (LimitExceeded, EXIT_LIMIT, "limit exceeded"),
    (TrainingDiverged, EXIT_DIVERGED, "training diverged"),
    (Timeout, EXIT_TIMEOUT, "timed out"),
    (Unauthenticated, EXIT_AUTH, "unauthenticated"),
    (PermissionDenied, EXIT_AUTH, "permission denied"),
    (RnnServeError, EXIT_ERROR, "error"),
]

EXIT_CODES_HELP = """\
exit codes:
  0    success (health: the server is SERVING)
  1    any other error
  2    usage error (bad flags, no input text, an input file that does not exist)
  3    session not found
  4    conflict: the session id is taken, or the session is busy training
  5    server unavailable, not SERVING, or shutting down
  6    invalid argument (the message names the field)
  7    a server limit would be exceeded (the message names the setting)
  8    training diverged: loss not finite (update not applied) or above 2 ln V for a
       whole report window (lower it: rnnserve set ID --learning-rate 1e-3)
  9    timed out (raise --timeout)
  10   unauthenticated or permission denied (--token / RNNSERVE_TOKEN)
  11   the session is broken: its checkpoint could not be loaded (rnnserve show ID
       shows why); fix or restore the file, or rnnserve delete ID
  130  interrupted with Ctrl-C (a running train is cancelled cleanly first)
"""

MAIN_EPILOG = f"""\
examples:
  rnnserve create input.txt --id shakespeare      # prints the session id
  rnnserve train shakespeare --steps 5000 --sample-length 80
  rnnserve generate shakespeare --length 500 --prime "ROMEO:" --seed 1
  rnnserve plot shakespeare --output loss.png     # or in the terminal; watch --plot: live
  eval "$(rnnserve completion bash)"              # tab-completes commands, flags and ids
  rnnserve --json list | jq .session_id
  rnnserve --address server:50051 --token "$TOKEN" --ca-file ca.pem health

environment:
  RNNSERVE_ADDRESS   default for --address ({DEFAULT_ADDRESS} if unset)
  RNNSERVE_TOKEN     default for --token
  RNNSERVE_CA_FILE   default for --ca-file

Errors are one line on stderr. With --json every result is one JSON object per line on
stdout (proto field names; int64 as numbers; enums as names).

{EXIT_CODES_HELP}"""


class UsageError(Exception):
    """A mistake in the command line found after parsing: exit code 2."""


# ---------------------------------------------------------------------------------------------
# Output.


def message_to_dict(message: Message) -> dict[str, Any]:
    """A message as the JSON the CLI prints: proto field names, zeros included, int64 as ints."""
    return json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,
    )


class Output:
    """Where results go: stdout as text, or as one JSON object per line with --json."""

    def __init__(self, as_json: bool, stream: TextIO | None = None) -> None:
        self.json = as_json
        self.stream = stream if stream is not None else sys.stdout

    def line(self, text: str = "") -> None:
        """Print a line of text (plain mode only)."""
        if not self.json:
            print(text, file=self.stream, flush=True)

    def obj(self, value: Message | dict[str, Any]) -> None:
        """Print one JSON object (JSON mode only)."""
        if self.json:
            data = message_to_dict(value) if isinstance(value, Message) else value
            print(json.dumps(data, ensure_ascii=False), file=self.stream, flush=True)


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    name: str = enum.Name(value) if value in enum.values() else str(value)
    return name.removeprefix(prefix).lower().replace("_", "-")


def _format_config(config: pb.SessionConfig) -> str:
    return " ".join(
        [
            f"hidden_size={config.hidden_size}",
            f"seq_length={config.seq_length}",
            f"batch_size={config.batch_size}",
            f"learning_rate={config.learning_rate:g}",
            f"optimizer={_enum_name(pb.Optimizer, config.optimizer, 'OPTIMIZER_')}",
            f"clip={config.clip:g}",
            f"seed={config.seed}",
            f"dtype={_enum_name(pb.DataType, config.dtype, 'DATA_TYPE_')}",
            f"reset_every={config.reset_every}",
            f"validation_fraction={config.validation_fraction:g}",
            f"cell={_enum_name(pb.Cell, config.cell, 'CELL_')}",
            f"num_layers={config.num_layers}",
            f"dropout={config.dropout:g}",
        ]
    )


def _state(session: pb.Session) -> str:
    return _enum_name(pb.SessionState, session.state, "SESSION_STATE_")


def _timestamp(session: pb.Session, field: str) -> str:
    if not session.HasField(field):
        return "-"
    stamp = getattr(session, field)
    text: str = stamp.ToJsonString()
    return text


def _show_session(out: Output, session: pb.Session) -> None:
    out.obj(session)
    rows = [
        ("session_id", session.session_id),
        ("state", _state(session)),
        ("step", str(session.step)),
        ("loss", f"{session.loss:.4f} nats/char (smoothed {session.smoothed_loss:.4f})"),
        ("corpus", f"{session.corpus_chars:,} chars"),
        ("alphabet", f"{len(session.alphabet)} chars: {session.alphabet!r}"),
        ("parameters", f"{session.parameter_count:,}"),
        (
            "validation",
            f"{session.validation_loss:.4f} nats/char at step {session.validation_step} "
            f"({session.validation_chars:,} chars held out)"
            if session.HasField("validation_loss")
            else (
                f"not measured yet ({session.validation_chars:,} chars held out)"
                if session.validation_chars
                else "none (no validation split)"
            ),
        ),
        ("config", _format_config(session.config)),
        ("created", _timestamp(session, "create_time")),
        ("updated", _timestamp(session, "update_time")),
        ("resident", "yes" if session.resident else "no (on disk only)"),
        ("checkpointed", f"step {session.checkpointed_step}"),
    ]
    if session.error:
        rows.append(("error", session.error))
    for key, value in rows:
        out.line(f"{key + ':':<14}{value}")


# ---------------------------------------------------------------------------------------------
# Input.


def _read_text(path: str | None, text: str | None, what: str) -> str:
    """The text from --text, a file ('-' is stdin), or piped stdin; UsageError if none."""
    if text is not None:
        if path is not None:
            raise UsageError(f"give {what} as FILE or --text, not both")
        return text
    if path is None:
        if sys.stdin.isatty():
            raise UsageError(f"give {what} as a FILE argument, with --text, or on stdin")
        path = "-"
    if path == "-":
        return sys.stdin.read()
    with _open_input(path) as f:
        return f.read()


def _open_input(path: str) -> TextIO:
    """Open a text file given on the command line; a missing one is a usage error (exit 2)."""
    try:
        return open(path, encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None


# ---------------------------------------------------------------------------------------------
# Commands: each takes the client, the parsed arguments and the output, returns an exit code.


def cmd_create(client: Client, args: argparse.Namespace, out: Output) -> int:
    text = _read_text(args.file, args.text, "the initial text")
    session = client.create_session(
        text,
        session_id=args.id,
        preset=args.preset,
        alphabet=args.alphabet,
        hidden_size=args.hidden_size,
        seq_length=args.seq_length,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        optimizer=args.optimizer,
        clip=args.clip,
        seed=args.seed,
        dtype=args.dtype,
        reset_every=args.reset_every,
        validation_fraction=args.validation_fraction,
        cell=args.cell,
        num_layers=args.num_layers,
        dropout=args.dropout,
    )
    info = session.last_info if session.last_info is not None else session.info()
    out.obj(info)
    out.line(session.id)
    return EXIT_OK


def _created(session: pb.Session) -> str:
    if not session.HasField("create_time"):
        return "-"
    when = session.create_time.ToDatetime(tzinfo=datetime.UTC).astimezone()
    return when.strftime("%Y-%m-%d %H:%M")


def cmd_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    rows: list[list[str]] = []
    for session in client.list_sessions(page_size=args.page_size):
        out.obj(session)
        rows.append(
            [
                session.session_id,
                _state(session),
                str(session.step),
                f"{session.loss:.4f}" if session.step else "-",
                str(session.config.hidden_size or "-"),  # a BROKEN session has no config
                _enum_name(pb.Optimizer, session.config.optimizer, "OPTIMIZER_")
                if session.config.optimizer
                else "-",
                _created(session),
                str(session.checkpointed_step),
            ]
        )
    if not rows:
        out.line("no sessions (make one: rnnserve create FILE --id NAME)")
        return EXIT_OK
    header = ["ID", "STATE", "STEP", "LOSS", "HIDDEN", "OPTIMIZER", "CREATED", "CHECKPOINTED"]
    right = {2, 3, 4, 7}  # numbers line up on the right
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        out.line("  ".join(cells).rstrip())
    return EXIT_OK


def cmd_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    _show_session(out, client.session(args.id).info())
    return EXIT_OK


def _confirm_delete(client: Client, session_id: str, yes: bool) -> bool:
    """True to go ahead: the session is not training, --yes, or the user said yes."""
    if yes:
        return True
    info = client.session(session_id).info()
    if info.state != pb.SESSION_STATE_TRAINING:
        return True
    if not sys.stdin.isatty():
        raise SessionBusy(
            f"session {session_id!r} is training (step {info.step}); not deleted. "
            "Pass --yes to delete it anyway (the training stops)",
        )
    sys.stderr.write(
        f"session {session_id!r} is training (step {info.step}). Delete it anyway? [y/N] "
    )
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().lower()
    return answer in ("y", "yes")


def cmd_delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    code = EXIT_OK
    for session_id in args.ids:
        if not _confirm_delete(client, session_id, args.yes):
            print(f"{PROG}: kept {session_id}", file=sys.stderr)
            code = EXIT_CONFLICT
            continue
        client.session(session_id).delete()
        out.obj({"session_id": session_id, "deleted": True})
        out.line(f"deleted {session_id}")
    return code


def cmd_append(client: Client, args: argparse.Namespace, out: Output) -> int:
    session = client.session(args.id)
    if args.text is not None:
        if args.file is not None:
            raise UsageError("give the text as FILE or --text, not both")
        response = session.append_text(args.text)
    elif args.file is None and sys.stdin.isatty():
        raise UsageError("give the text as a FILE argument, with --text, or on stdin")
    elif args.file in (None, "-"):
        response = session.append_text(sys.stdin)
    else:
        with _open_input(args.file) as f:
            response = session.append_text(f)
    out.obj(response)
    out.line(
        f"appended {response.appended_chars:,} chars to {args.id} "
        f"(corpus now {response.session.corpus_chars:,} chars)"
    )
    return EXIT_OK


def cmd_step(client: Client, args: argparse.Namespace, out: Output) -> int:
    result = client.session(args.id).step(args.text)
    out.obj(result)
    out.line(
        f"step {result.step}  loss {result.loss:.4f} nats/char ({result.bits_per_char:.4f} "
        f"bits)  grad_norm {result.grad_norm:.4f}  chars {result.chars}"
    )
    return EXIT_OK


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
    stream = session.train(
        args.steps,
        args.report_every,
        args.sample_length,
        until_loss=args.until_loss,
        patience=args.patience,
        eval_every=args.eval_every,
        sample_temperature=args.sample_temperature,
        sample_prime=args.sample_prime,
    )
    bar = tqdm(
        total=args.steps,
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


def cmd_set(client: Client, args: argparse.Namespace, out: Output) -> int:
    changes = _setting_changes(args)
    if not changes:
        raise UsageError(
            "give at least one setting to change: --learning-rate, --clip, --reset-every "
            "or --optimizer"
        )
    info = client.session(args.id).update(**changes)
    out.obj(info)
    out.line(f"{args.id}: {_format_config(info.config)}")
    return EXIT_OK


def _setting_changes(args: argparse.Namespace) -> dict[str, Any]:
    names = ("learning_rate", "clip", "reset_every", "optimizer")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def cmd_fork(client: Client, args: argparse.Namespace, out: Output) -> int:
    copy = client.session(args.id).fork(args.new_id, **_setting_changes(args))
    info = copy.last_info if copy.last_info is not None else copy.info()
    out.obj(info)
    out.line(copy.id)
    return EXIT_OK


def cmd_export(client: Client, args: argparse.Namespace, out: Output) -> int:
    path = args.output if args.output is not None else f"{args.id}.rnn"
    data = client.session(args.id).export(path)
    out.obj({"session_id": args.id, "path": path, "bytes": len(data)})
    out.line(f"exported {args.id} to {path} ({len(data):,} bytes)")
    return EXIT_OK


def cmd_import(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.file == "-":
        session = client.import_session(sys.stdin.buffer, args.id)
    else:
        session = client.import_session(args.file, args.id)
    info = session.last_info if session.last_info is not None else session.info()
    out.obj(info)
    out.line(session.id)
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


def cmd_generate(client: Client, args: argparse.Namespace, out: Output) -> int:
    stream = client.session(args.id).generate_stream(
        args.length, args.prime, args.temperature, args.top_k, args.seed
    )
    ends_with_newline = True
    if args.prime and not out.json:
        # The sample continues the prime: print it first so the text reads as a whole.
        out.stream.write(args.prime)
        out.stream.flush()
        ends_with_newline = args.prime.endswith("\n")
    with stream:
        for chunk in stream:
            if out.json:
                out.obj({"text": chunk})
            else:
                out.stream.write(chunk)
                out.stream.flush()
                ends_with_newline = chunk.endswith("\n")
    if not out.json and not ends_with_newline and out.stream.isatty():
        out.stream.write("\n")
    return EXIT_OK


def cmd_predict(client: Client, args: argparse.Namespace, out: Output) -> int:
    text = _read_text(args.file, args.text, "the text to predict on")
    result = client.session(args.id).predict(text)
    out.obj(result)
    out.line(f"text:      {text}")
    out.line(f"predicted: {result.predicted}")
    out.line(f"loss:      {result.loss:.4f} nats/char ({result.bits_per_char:.4f} bits/char)")
    return EXIT_OK


def cmd_health(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.wait is not None:
        try:
            client.wait_ready(args.wait, service=args.service)
        except Timeout as e:
            out.obj({"status": "NOT_SERVING", "error": e.details})
            print(f"{PROG}: unavailable: {e.details}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        status = "SERVING"
    else:
        status = client.health(args.service)
    out.obj({"status": status})
    out.line(status)
    return EXIT_OK if status == "SERVING" else EXIT_UNAVAILABLE


# ---------------------------------------------------------------------------------------------
# Parser.


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _connection_options(with_defaults: bool) -> argparse.ArgumentParser:
    """The global options, accepted before or after the command.

    The copy given to each subcommand defaults to SUPPRESS so that leaving an option out
    after the command keeps the value given (or defaulted) before it.
    """

    def default(value: Any) -> Any:
        return value if with_defaults else argparse.SUPPRESS

    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("connection and output")
    group.add_argument(
        "--address",
        default=default(os.environ.get("RNNSERVE_ADDRESS") or DEFAULT_ADDRESS),
        help="server host:port (env RNNSERVE_ADDRESS; default %(default)s)"
        if with_defaults
        else "server host:port (env RNNSERVE_ADDRESS)",
    )
    group.add_argument(
        "--token",
        default=default(None),
        help="bearer token for a server started with --auth-token (env RNNSERVE_TOKEN)",
    )
    group.add_argument(
        "--ca-file",
        default=default(os.environ.get("RNNSERVE_CA_FILE") or None),
        metavar="PEM",
        help="connect with TLS, trusting this CA certificate (env RNNSERVE_CA_FILE)",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="connect with TLS using gRPC's default root certificates",
    )
    group.add_argument(
        "--timeout",
        type=_seconds,
        default=default(30.0),
        metavar="SECONDS",
        help="deadline of each unary call (default 30); train, watch and generate "
        "streams have none",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print results as JSON, one object per line; no progress bars",
    )
    return parser


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hyperparameters (unset: the preset's value)")
    group.add_argument("--preset", choices=list(PRESETS), default="default")
    group.add_argument("--hidden-size", type=_positive_int, metavar="N", help="hidden units")
    group.add_argument("--seq-length", type=_positive_int, metavar="N", help="BPTT window")
    group.add_argument("--batch-size", type=_positive_int, metavar="N", help="parallel strands")
    group.add_argument("--learning-rate", type=float, metavar="LR")
    group.add_argument("--optimizer", choices=list(OPTIMIZERS))
    group.add_argument("--clip", type=float, metavar="C", help="clip gradients to [-C, C]")
    group.add_argument("--seed", type=int, help="makes training reproducible")
    group.add_argument("--dtype", choices=list(DTYPES))
    group.add_argument(
        "--reset-every",
        type=_nonnegative_int,
        metavar="N",
        help="zero the carried hidden state every N windows (0 never)",
    )
    group.add_argument("--cell", choices=list(CELLS), help="recurrent unit of every layer")
    group.add_argument("--num-layers", type=_positive_int, metavar="N", help="stacked layers")
    group.add_argument(
        "--dropout",
        type=float,
        metavar="P",
        help="share of a layer's outputs zeroed before the next, training only (num-layers >= 2)",
    )
    group.add_argument(
        "--validation-fraction",
        type=float,
        metavar="F",
        help="hold out this share of the corpus's tail (0 to 0.5) to measure validation loss",
    )


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings to change (unset: unchanged)")
    group.add_argument("--learning-rate", type=float, metavar="LR")
    group.add_argument(
        "--optimizer",
        choices=list(OPTIMIZERS),
        help="a new optimizer starts with fresh state",
    )
    group.add_argument("--clip", type=float, metavar="C", help="clip gradients to [-C, C]")
    group.add_argument(
        "--reset-every",
        type=_nonnegative_int,
        metavar="N",
        help="zero the carried hidden state every N windows (0 never)",
    )


def _add_chart_size_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--width", type=_positive_int, metavar="COLS", help="chart width (default: the terminal's)"
    )
    parser.add_argument(
        "--height",
        type=_positive_int,
        metavar="ROWS",
        help="chart height (default: the terminal's)",
    )


Command = Callable[[Client, argparse.Namespace, Output], int]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (exposed for tests and docs)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Talk to an rnnserve server: create character-level RNN sessions, "
        "train them, watch their loss and sample text from them.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_connection_options(with_defaults=True)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _connection_options(with_defaults=False)

    def command(name: str, func: Command, help: str, examples: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help,
            description=help,
            epilog="examples:\n" + examples,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )
        sub.set_defaults(func=func)
        return sub

    p = command(
        "create",
        cmd_create,
        "create a session from text; prints its id",
        "  rnnserve create input.txt --id shakespeare\n"
        "  cat *.py | rnnserve create --hidden-size 256 --batch-size 32\n"
        "  rnnserve create --text Hallo --preset notebook --id hallo\n",
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="text file ('-' or piped: stdin)")
    p.add_argument("--text", help="the text itself instead of a file")
    p.add_argument("--id", default="", help="session id (default: the server makes one)")
    p.add_argument("--alphabet", default="", help="fix the vocabulary (default: the text's)")
    _add_config_flags(p)

    p = command(
        "list",
        cmd_list,
        "list every session",
        "  rnnserve list\n  rnnserve --json list | jq -r .session_id\n",
    )
    p.add_argument("--page-size", type=_positive_int, default=100, help=argparse.SUPPRESS)

    p = command("show", cmd_show, "show a session's config and progress", "  rnnserve show hallo\n")
    p.add_argument("id", metavar="ID")

    p = command(
        "delete",
        cmd_delete,
        "delete sessions (asks first if one is training; --yes skips the question)",
        "  rnnserve delete hallo\n  rnnserve delete a b c\n  rnnserve delete shakespeare --yes\n",
    )
    p.add_argument("ids", nargs="+", metavar="ID")
    p.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="don't ask before deleting a session that is training",
    )

    p = command(
        "append",
        cmd_append,
        "add text to a session's corpus (streamed in chunks)",
        "  rnnserve append shakespeare more.txt\n  cat notes/*.txt | rnnserve append notes\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("file", nargs="?", metavar="FILE", help="text file ('-' or piped: stdin)")
    p.add_argument("--text", help="the text itself instead of a file")

    p = command(
        "step",
        cmd_step,
        "apply one optimizer update",
        "  rnnserve step hallo\n  rnnserve step hallo --text 'Hallo'\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("--text", help="train on this text from a zero state instead of the corpus")

    p = command(
        "train",
        cmd_train,
        "apply many updates with a progress bar; Ctrl-C cancels cleanly",
        "  rnnserve train shakespeare --steps 5000\n"
        "  rnnserve train shakespeare --steps 100000 --max-seconds 60 --sample-length 80\n"
        "  rnnserve --json train hallo --steps 30 --report-every 10\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("--steps", type=_positive_int, default=1000, help="updates (default 1000)")
    p.add_argument(
        "--report-every",
        type=_nonnegative_int,
        default=0,
        metavar="N",
        help="progress every N updates (default 0: about once a second)",
    )
    p.add_argument(
        "--sample-length",
        type=_nonnegative_int,
        default=0,
        metavar="N",
        help="add an N-character sample to each progress report",
    )
    p.add_argument(
        "--max-seconds",
        type=_seconds,
        metavar="S",
        help="stop (cancel cleanly) after S seconds even if steps remain",
    )
    p.add_argument(
        "--until-loss",
        type=float,
        metavar="NATS",
        help="stop once the loss reaches NATS per char (the validation loss with a "
        "validation split, else the smoothed loss)",
    )
    p.add_argument(
        "--patience",
        type=_nonnegative_int,
        default=0,
        metavar="N",
        help="early stopping: stop after N validation measurements without a new best "
        "(needs a validation split)",
    )
    p.add_argument(
        "--eval-every",
        type=_nonnegative_int,
        default=0,
        metavar="N",
        help="measure the validation loss every N updates (default: at each report)",
    )
    p.add_argument(
        "--sample-temperature",
        type=float,
        metavar="T",
        help="temperature of the samples (default 1; 0 greedy)",
    )
    p.add_argument("--sample-prime", default="", metavar="TEXT", help="start each sample with TEXT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = command(
        "set",
        cmd_set,
        "change a session's settings (not while it trains)",
        "  rnnserve set shakespeare --learning-rate 1e-3\n"
        "  rnnserve set shakespeare --optimizer adagrad --learning-rate 0.05\n",
    )
    p.add_argument("id", metavar="ID")
    _add_setting_flags(p)

    p = command(
        "fork",
        cmd_fork,
        "copy a session under a new id, optionally with changed settings; prints the new id",
        "  rnnserve fork shakespeare shakespeare-lr1e-4 --learning-rate 1e-4\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("new_id", metavar="NEWID")
    _add_setting_flags(p)

    p = command(
        "export",
        cmd_export,
        "save a whole session (weights, optimizer, corpus, history) to an archive file",
        "  rnnserve export shakespeare -o model.rnn\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("-o", "--output", metavar="FILE", help="archive path (default: ID.rnn)")

    p = command(
        "import",
        cmd_import,
        "make a session from an archive made by export; prints its id",
        "  rnnserve import model.rnn --id shakespeare-copy\n",
    )
    p.add_argument("file", metavar="FILE", help="archive path ('-' is stdin)")
    p.add_argument("--id", default="", help="the new session's id (default: the archive's)")

    p = command(
        "watch",
        cmd_watch,
        "follow a session's loss live, whoever trains it",
        "  rnnserve watch shakespeare\n"
        "  rnnserve watch shakespeare --from-step 1 --no-progress > loss.txt\n"
        "  rnnserve --json watch hallo --count 30\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument(
        "--from-step",
        type=_nonnegative_int,
        default=None,
        metavar="N",
        help="replay history from step N (default: only new updates)",
    )
    p.add_argument("--count", type=_positive_int, metavar="N", help="stop after N points")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="print 'step loss' lines instead of the status line",
    )
    p.add_argument(
        "--plot",
        action="store_true",
        help="redraw the loss chart live (default --from-step 1: the whole history)",
    )
    p.add_argument(
        "--interval",
        type=_seconds,
        default=1.0,
        metavar="S",
        help="redraw every S seconds (default 1)",
    )
    _add_chart_size_flags(p)

    p = command(
        "plot",
        cmd_plot,
        "the session's loss history as a chart, an image or CSV",
        "  rnnserve plot shakespeare                       # a chart in the terminal\n"
        "  rnnserve plot shakespeare -o loss.png      # or .svg: pip install 'rnnserve[plot]'\n"
        "  rnnserve plot shakespeare --format csv > loss.csv   # step,loss,smoothed[,validation]\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="write a .png or .svg image with matplotlib instead of drawing in the terminal",
    )
    p.add_argument(
        "--format",
        choices=["chart", "csv"],
        default="chart",
        help="chart (default) or csv: step,loss,smoothed[,validation] on stdout",
    )
    p.add_argument(
        "--from-step",
        type=_positive_int,
        default=1,
        metavar="N",
        help="start at step N (default 1)",
    )
    _add_chart_size_flags(p)

    p = command(
        "generate",
        cmd_generate,
        "sample text from a session, printed as it streams",
        "  rnnserve generate shakespeare --length 500\n"
        "  rnnserve generate shakespeare --prime 'ROMEO:' --temperature 0.7 --top-k 10 --seed 1\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("--length", type=_positive_int, default=200, help="characters (default 200)")
    p.add_argument("--prime", default="", help="text that warms up the hidden state")
    p.add_argument(
        "--temperature", type=float, default=1.0, help="0 greedy, <1 safer, >1 wilder (default 1)"
    )
    p.add_argument(
        "--top-k",
        type=_nonnegative_int,
        default=0,
        metavar="K",
        help="sample among the k likeliest",
    )
    p.add_argument("--seed", type=int, help="the same seed gives the same text")

    p = command(
        "predict",
        cmd_predict,
        "most likely next character at each position of a text, and the loss",
        "  rnnserve predict hallo Hallo          # predicted: alloH\n"
        "  rnnserve --json predict shakespeare --file test.txt\n",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("text", nargs="?", metavar="TEXT")
    p.add_argument("--file", help="read the text from a file ('-' is stdin)")

    p = command(
        "health",
        cmd_health,
        "check the server; exit 0 iff it is SERVING (a container HEALTHCHECK)",
        "  rnnserve health\n  rnnserve --timeout 3 health || echo down\n"
        "  rnnserve health --wait 30    # wait up to 30 s for the server to come up\n",
    )
    p.add_argument("--service", default="", help="a service name (default: the whole server)")
    p.add_argument("--wait", type=_seconds, metavar="SECONDS", help="wait until SERVING")

    p = command(
        "completion",
        cmd_completion,
        "print the shell completion script (commands, flags, session ids)",
        '  eval "$(rnnserve completion bash)"     # add to ~/.bashrc\n'
        "  # zsh: autoload -U bashcompinit && bashcompinit, then the same\n",
    )
    p.add_argument("shell", choices=["bash"], help="only bash for now (zsh via bashcompinit)")
    return parser


def _error_line(error: RnnServeError, address: str) -> tuple[int, str]:
    for cls, code, label in ERRORS:
        if isinstance(error, cls):
            details = " ".join(error.details.split())
            if cls is ServerUnavailable:
                details = f"cannot reach the server at {address}: {details}"
            return code, f"{PROG}: {label}: {details}"
    return EXIT_ERROR, f"{PROG}: error: {error}"  # pragma: no cover - RnnServeError matches


def _complete(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    if not argv or not argv[0].isdigit():
        return EXIT_USAGE
    for word in completion.complete(parser, argv[1:], int(argv[0])):
        print(word)
    return EXIT_OK


def cmd_completion(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.stream.write(completion.BASH_SCRIPT)
    return EXIT_OK


def _did_you_mean(args: argparse.Namespace) -> str:
    """ " (did you mean 'x'?)" when a session id on the command line is missing and a
    close one exists on the server; "" otherwise (or if the server doesn't answer)."""
    wanted = [args.id] if isinstance(getattr(args, "id", None), str) else getattr(args, "ids", [])
    try:
        with Client(
            args.address, timeout=5.0, token=args.token, ca_file=args.ca_file, tls=args.tls
        ) as client:
            known = [s.session_id for s in itertools.islice(client.list_sessions(), 10_000)]
    except RnnServeError:
        return ""
    for session_id in wanted:
        if session_id and session_id not in known:
            close = difflib.get_close_matches(session_id, known, n=1, cutoff=0.6)
            if close:
                return f" (did you mean {close[0]!r}?)"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["__complete"]:  # the shell completion function asks (see completion.py)
        return _complete(parser, argv[1:])
    args = parser.parse_args(argv)
    out = Output(args.json)
    try:
        with Client(
            args.address,
            timeout=args.timeout,
            token=args.token,
            ca_file=args.ca_file,
            tls=args.tls,
        ) as client:
            code: int = args.func(client, args, out)
            return code
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RnnServeError as e:
        code, line = _error_line(e, args.address)
        if isinstance(e, SessionNotFound):
            line += _did_you_mean(args)
        print(line, file=sys.stderr)
        return code
    except OSError as e:
        if isinstance(e, BrokenPipeError):
            # The reader went away (`rnnserve generate ... | head`): not an error.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_OK
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG}: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_ERROR
    except UnicodeDecodeError as e:
        print(f"{PROG}: error: the input is not UTF-8 text ({e.reason})", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
