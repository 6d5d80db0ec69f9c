"""The ``rnnserve`` command: a thin shell over :mod:`rnnserve.client`.

Each command builds a :class:`~rnnserve.Client`, calls one library method, prints the result
(as text, or one JSON object per line with ``--json``) and turns library errors into a
one-line message on stderr and an exit code (see ``EXIT_CODES``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message
from tqdm import tqdm

from rnnserve import __version__
from rnnserve.client import DEFAULT_ADDRESS, DTYPES, OPTIMIZERS, PRESETS, Client, TrainStream
from rnnserve.errors import (
    InvalidArgument,
    LimitExceeded,
    PermissionDenied,
    RnnServeError,
    ServerUnavailable,
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
EXIT_INTERRUPTED = 130

# (exception type, exit code, label) in match order: subclasses before RnnServeError.
ERRORS: list[tuple[type[RnnServeError], int, str]] = [
    (SessionNotFound, EXIT_NOT_FOUND, "not found"),
    (SessionExists, EXIT_CONFLICT, "already exists"),
    (SessionBusy, EXIT_CONFLICT, "busy"),
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
  2    usage error (bad flags, no input text)
  3    session not found
  4    conflict: the session id is taken, or the session is busy training
  5    server unavailable, not SERVING, or shutting down
  6    invalid argument (the message names the field)
  7    a server limit would be exceeded (the message names the setting)
  8    training diverged: loss not finite, update not applied (lower the learning rate)
  9    timed out (raise --timeout)
  10   unauthenticated or permission denied (--token / RNNSERVE_TOKEN)
  130  interrupted with Ctrl-C (a running train is cancelled cleanly first)
"""

MAIN_EPILOG = f"""\
examples:
  rnnserve create input.txt --id shakespeare      # prints the session id
  rnnserve train shakespeare --steps 5000 --sample-length 80
  rnnserve generate shakespeare --length 500 --prime "ROMEO:" --seed 1
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
    with open(path, encoding="utf-8") as f:
        return f.read()


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
    )
    info = session.last_info if session.last_info is not None else session.info()
    out.obj(info)
    out.line(session.id)
    return EXIT_OK


def cmd_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    header = f"{'ID':<24} {'STATE':<9} {'STEP':>9} {'LOSS':>8} {'CHARS':>12}  RESIDENT"
    printed_header = False
    for session in client.list_sessions(page_size=args.page_size):
        out.obj(session)
        if not printed_header:
            out.line(header)
            printed_header = True
        out.line(
            f"{session.session_id:<24} {_state(session):<9} {session.step:>9} "
            f"{session.loss:>8.4f} {session.corpus_chars:>12,}  "
            f"{'yes' if session.resident else 'no'}"
        )
    return EXIT_OK


def cmd_show(client: Client, args: argparse.Namespace, out: Output) -> int:
    _show_session(out, client.session(args.id).info())
    return EXIT_OK


def cmd_delete(client: Client, args: argparse.Namespace, out: Output) -> int:
    for session_id in args.ids:
        client.session(session_id).delete()
        out.obj({"session_id": session_id, "deleted": True})
        out.line(f"deleted {session_id}")
    return EXIT_OK


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
        with open(args.file, encoding="utf-8") as f:
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
    return (
        f"step {p.step}  loss {p.loss:.4f}  smoothed {p.smoothed_loss:.4f}  "
        f"{p.chars_per_second:,.0f} chars/s  {p.elapsed_seconds:.1f} s"
    )


def cmd_train(client: Client, args: argparse.Namespace, out: Output) -> int:
    session = client.session(args.id)
    stream = session.train(args.steps, args.report_every, args.sample_length)
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
            bar.set_postfix_str(
                f"loss {progress.loss:.3f} (avg {progress.smoothed_loss:.3f}) "
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
    return EXIT_OK


def _stop_reason(progress: pb.TrainResponse) -> str:
    return _enum_name(pb.StopReason, progress.stop_reason, "STOP_REASON_")


def _report_cancelled(session: Any, stream: TrainStream, why: str) -> None:
    """After a cancel: say where training stopped (asking the server, if it answers)."""
    try:
        step: int | None = session.info(timeout=5.0).step
    except RnnServeError:
        step = stream.last.step if stream.last is not None else None
    where = f"; the session is at step {step}" if step is not None else ""
    print(f"{PROG}: {why}{where}", file=sys.stderr)


def cmd_watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    session = client.session(args.id)
    # Without --from-step, follow from the next update: ask where the session is now.
    from_step = args.from_step if args.from_step is not None else session.info().step + 1
    stream = session.watch_loss(from_step)
    bar = tqdm(
        unit="step",
        desc=args.id,
        file=sys.stderr,
        **_bar_width(),
        disable=True if (out.json or args.no_progress) else None,
    )
    show_bar = not bar.disable  # (close() sets disable)
    last: pb.LossPoint | None = None
    seen = 0
    try:
        for point in stream:
            last = point
            seen += 1
            out.obj(point)
            if show_bar:
                bar.update(1)
                bar.set_postfix_str(f"step {point.step}, loss {point.loss:.4f}", refresh=False)
            else:
                out.line(f"{point.step} {point.loss:.6f}")
            if args.count is not None and seen >= args.count:
                stream.cancel()
                break
    except KeyboardInterrupt:
        stream.cancel()
        return EXIT_INTERRUPTED
    finally:
        bar.close()
    if show_bar and last is not None:
        out.line(f"last: step {last.step} loss {last.loss:.6f}")
    return EXIT_OK


def cmd_generate(client: Client, args: argparse.Namespace, out: Output) -> int:
    stream = client.session(args.id).generate_stream(
        args.length, args.prime, args.temperature, args.top_k, args.seed
    )
    ends_with_newline = True
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
        "delete sessions",
        "  rnnserve delete hallo\n  rnnserve delete a b c\n",
    )
    p.add_argument("ids", nargs="+", metavar="ID")

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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

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
        help="print 'step loss' lines instead of a progress bar",
    )

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
    return parser


def _error_line(error: RnnServeError, address: str) -> tuple[int, str]:
    for cls, code, label in ERRORS:
        if isinstance(error, cls):
            details = " ".join(error.details.split())
            if cls is ServerUnavailable:
                details = f"cannot reach the server at {address}: {details}"
            return code, f"{PROG}: {label}: {details}"
    return EXIT_ERROR, f"{PROG}: error: {error}"  # pragma: no cover - RnnServeError matches


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script exits with it)."""
    parser = build_parser()
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
