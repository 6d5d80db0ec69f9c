"""``list``: every session as a table, sorted by a column, filtered by state, refreshed with
``--watch``. The columns are listed once in ``COLUMNS``."""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rnnserve.cli.exit_codes import EXIT_INTERRUPTED, EXIT_OK
from rnnserve.cli.flags import _seconds
from rnnserve.cli.jobs import job_progress, job_state
from rnnserve.cli.output import Output, _enum_name, _state
from rnnserve.cli.training import _CtrlC, _on_ctrl_c
from rnnserve.client import Client
from rnnserve.v1 import rnn_service_pb2 as pb


@dataclass(frozen=True)
class Column:
    """One column: its header, its text, its sort value (None: no value, sorted last)."""

    header: str
    text: Callable[[pb.Session], str]
    value: Callable[[pb.Session], Any]
    right: bool = False  # numbers line up on the right
    optional: bool = False  # shown only when some listed session has a value

    @property
    def key(self) -> str:
        """The name --sort takes: the header in lower case."""
        return self.header.lower()


def _configured(get: Callable[[pb.SessionConfig], Any]) -> Callable[[pb.Session], Any]:
    """A config field's value; None for a session with no config (BROKEN)."""
    return lambda s: get(s.config) if s.HasField("config") and s.config.hidden_size else None


def _optional(name: str) -> Callable[[pb.Session], float | None]:
    return lambda s: getattr(s, name) if s.HasField(name) else None


def _text(value: Callable[[pb.Session], Any], fmt: str = "{}") -> Callable[[pb.Session], str]:
    def text(s: pb.Session) -> str:
        v = value(s)
        return "-" if v is None else fmt.format(v)

    return text


def _created(s: pb.Session) -> str:
    if not s.HasField("create_time"):
        return "-"
    when = s.create_time.ToDatetime(tzinfo=datetime.UTC).astimezone()
    return when.strftime("%Y-%m-%d %H:%M")


_cell = _configured(lambda c: _enum_name(pb.Cell, c.cell, "CELL_"))
_layers = _configured(lambda c: c.num_layers)
_hidden = _configured(lambda c: c.hidden_size)
_optimizer = _configured(lambda c: _enum_name(pb.Optimizer, c.optimizer, "OPTIMIZER_"))
_validation = _optional("validation_loss")
_speed = _optional("chars_per_second")


def _job(s: pb.Session) -> str | None:
    """The session's queued or running training job: its id, state, progress and ETA."""
    if not s.HasField("job"):
        return None
    return f"{s.job.job_id} {job_state(s.job)} {job_progress(s.job)}"


# In display order.
COLUMNS: list[Column] = [
    Column("ID", lambda s: s.session_id, lambda s: s.session_id),
    Column("STATE", _state, _state),
    Column("JOB", _text(_job), _job, optional=True),
    Column("CELL", _text(_cell), _cell),
    Column("LAYERS", _text(_layers), _layers, right=True),
    Column("HIDDEN", _text(_hidden), _hidden, right=True),
    Column("OPTIMIZER", _text(_optimizer), _optimizer),
    Column("STEP", lambda s: str(s.step), lambda s: s.step, right=True),
    Column(
        "LOSS",
        lambda s: f"{s.loss:.4f}" if s.step else "-",
        lambda s: s.loss if s.step else None,
        right=True,
    ),
    Column("VAL_LOSS", _text(_validation, "{:.4f}"), _validation, right=True),
    Column("CHARS/S", _text(_speed, "{:,.0f}"), _speed, right=True),
    Column(
        "CREATED",
        _created,
        lambda s: s.create_time.ToNanoseconds() if s.HasField("create_time") else None,
    ),
    Column("CHECKPOINTED", lambda s: str(s.checkpointed_step), lambda s: s.checkpointed_step, True),
]
SORT_KEYS = [c.key for c in COLUMNS]
STATES = [_enum_name(pb.SessionState, v, "SESSION_STATE_") for v in pb.SessionState.values() if v]


def _sorted(sessions: list[pb.Session], key: str, reverse: bool) -> list[pb.Session]:
    """By the column ``key`` (ties keep the server's order: by id); no value always last."""
    column = next(c for c in COLUMNS if c.key == key)
    have = [s for s in sessions if column.value(s) is not None]
    missing = [s for s in sessions if column.value(s) is None]
    return sorted(have, key=column.value, reverse=reverse) + missing


def _table(sessions: list[pb.Session]) -> list[str]:
    shown = [c for c in COLUMNS if not c.optional or any(c.value(s) is not None for s in sessions)]
    rows = [[c.header for c in shown]] + [[c.text(s) for c in shown] for s in sessions]
    widths = [max(len(row[i]) for row in rows) for i in range(len(shown))]
    return [
        "  ".join(
            text.rjust(widths[i]) if shown[i].right else text.ljust(widths[i])
            for i, text in enumerate(row)
        ).rstrip()
        for row in rows
    ]


def _listing(client: Client, args: argparse.Namespace, out: Output) -> list[str]:
    """The sessions the flags ask for: printed as JSON objects, returned as table lines."""
    every = list(client.list_sessions(page_size=args.page_size))
    wanted = [s for s in every if not args.state or _state(s) in args.state]
    if args.sort:
        wanted = _sorted(wanted, args.sort, args.reverse)
    elif args.reverse:
        wanted.reverse()
    for session in wanted:
        out.obj(session)
    if wanted:
        return _table(wanted)
    if every:
        return [f"no sessions in state {' or '.join(args.state)} ({len(every)} in others)"]
    return ["no sessions (make one: rnnserve create FILE --id NAME)"]


def cmd_list(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.watch is None:
        for line in _listing(client, args, out):
            out.line(line)
        return EXIT_OK
    tty = not out.json and out.stream.isatty()
    ctrl_c = _CtrlC()
    with _on_ctrl_c(ctrl_c.press):  # between two refreshes, never inside a call
        while not ctrl_c.pressed:
            lines = _listing(client, args, out)
            if not out.json:
                now = datetime.datetime.now().strftime("%H:%M:%S")
                head = f"every {args.watch:g} s ({now}; Ctrl-C stops)"
                # One write per refresh: the table is replaced at once, without flicker.
                clear = "\x1b[H\x1b[2J" if tty else ""
                out.stream.write(clear + "\n".join([head, *lines]) + "\n" + ("" if tty else "\n"))
                out.stream.flush()
            ctrl_c.wait(args.watch)
    return EXIT_INTERRUPTED


def add_list_flags(parser: argparse.ArgumentParser) -> None:
    """list's flags (kept beside the columns they name)."""
    parser.add_argument(
        "--sort",
        choices=SORT_KEYS,
        metavar="COLUMN",
        help=f"sort by a column: {', '.join(SORT_KEYS)} (sessions without a value last)",
    )
    parser.add_argument("--reverse", "-r", action="store_true", help="largest first")
    parser.add_argument(
        "--state",
        action="append",
        choices=STATES,
        help="only sessions in this state (repeat for several)",
    )
    parser.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=_seconds,
        metavar="S",
        help="redraw the table every S seconds (default 2) until Ctrl-C",
    )
