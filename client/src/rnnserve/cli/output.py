"""Output (text, or one JSON object per line with ``--json``), how a session is shown, and
reading input text."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from rnnserve.cli.exit_codes import UsageError
from rnnserve.v1 import rnn_service_pb2 as pb


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


def _config_fields(config: pb.SessionConfig) -> list[tuple[str, str]]:
    """The config's fields as (name, text), in a fixed order."""
    return [
        ("hidden_size", str(config.hidden_size)),
        ("seq_length", str(config.seq_length)),
        ("batch_size", str(config.batch_size)),
        ("learning_rate", f"{config.learning_rate:g}"),
        ("optimizer", _enum_name(pb.Optimizer, config.optimizer, "OPTIMIZER_")),
        ("clip", f"{config.clip:g}"),
        ("seed", str(config.seed)),
        ("dtype", _enum_name(pb.DataType, config.dtype, "DATA_TYPE_")),
        ("reset_every", str(config.reset_every)),
        ("validation_fraction", f"{config.validation_fraction:g}"),
        ("cell", _enum_name(pb.Cell, config.cell, "CELL_")),
        ("num_layers", str(config.num_layers)),
        ("dropout", f"{config.dropout:g}"),
    ]


def _format_config(config: pb.SessionConfig) -> str:
    return " ".join(f"{name}={value}" for name, value in _config_fields(config))


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
        (
            "speed",
            f"{session.chars_per_second:,.0f} chars/s (its newest Train)"
            if session.HasField("chars_per_second")
            else "not measured (no Train since the server loaded it)",
        ),
        ("config", _format_config(session.config)),
        ("created", _timestamp(session, "create_time")),
        ("updated", _timestamp(session, "update_time")),
        ("resident", "yes" if session.resident else "no (on disk only)"),
        ("checkpointed", f"step {session.checkpointed_step}"),
    ]
    if session.HasField("job"):
        job = session.job
        state = _enum_name(pb.JobState, job.state, "JOB_STATE_")
        rows.append(("job", f"{job.name} {state}, step {job.step} of {job.target_step}"))
    if session.error:
        rows.append(("error", session.error))
    for key, value in rows:
        out.line(f"{key + ':':<14}{value}")


def _read_text(path: str | None, text: str | None, what: str) -> str:
    """The text from --text, a file ('-' is stdin), or piped stdin; UsageError if none, if
    it is empty or if it is not UTF-8 (naming the file)."""
    if text is not None:
        if path is not None:
            raise UsageError(f"give {what} as FILE or --text, not both")
        source = "--text"
    else:
        if path is None:
            if sys.stdin.isatty():
                raise UsageError(f"give {what} as a FILE argument, with --text, or on stdin")
            path = "-"
        source = _source_name(path)
        with _decoding(path):
            if path == "-":
                with _stdin_text() as stdin:
                    text = stdin.read()
            else:
                with _open_input(path) as f:
                    text = f.read()
    if not text:
        raise UsageError(f"no input text: {source} is empty")
    return text


def _source_name(path: str) -> str:
    return "stdin" if path == "-" else path


@contextlib.contextmanager
def _decoding(path: str) -> Iterator[None]:
    """Turn a UnicodeDecodeError while reading ``path`` into a UsageError naming it."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{_source_name(path)}: not UTF-8 text ({e.reason}); convert it first "
            "(e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _stdin_text() -> TextIO:
    """stdin decoded as strict UTF-8 (not the locale's codec, whose surrogate escapes for
    bad bytes would only fail later, inside the request)."""
    return open(sys.stdin.fileno(), encoding="utf-8", closefd=False)


def _open_input(path: str) -> TextIO:
    """Open a text file given on the command line; one that does not exist or is a
    directory is a usage error (exit 2)."""
    try:
        return open(path, encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, not a text file") from None
