"""The commands that make one call. Each takes the client, the parsed arguments and the
output, and returns an exit code."""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any

from rnnserve import completion
from rnnserve.cli.exit_codes import (
    EXIT_CONFLICT,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    PROG,
    UsageError,
    start_hint,
)
from rnnserve.cli.jobs import job_progress
from rnnserve.cli.output import (
    Output,
    _decoding,
    _enum_name,
    _format_config,
    _open_input,
    _read_text,
    _show_session,
    _source_name,
    _state,
    _stdin_text,
)
from rnnserve.client import Client
from rnnserve.errors import SessionBusy, Timeout
from rnnserve.v1 import rnn_service_pb2 as pb


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
                *(
                    [f"{session.job.job_id} {job_progress(session.job)}"]
                    if session.HasField("job")
                    else []
                ),
            ]
        )
    if not rows:
        out.line("no sessions (make one: rnnserve create FILE --id NAME)")
        return EXIT_OK
    header = ["ID", "STATE", "STEP", "LOSS", "HIDDEN", "OPTIMIZER", "CREATED", "CHECKPOINTED"]
    if any(len(row) > len(header) for row in rows):  # some session runs a training job
        header.append("JOB")
        rows = [row + [""] * (len(header) - len(row)) for row in rows]
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
        with _stdin_text() as stdin, _decoding("-"):
            response = session.append_text(stdin)
    else:
        with _open_input(args.file) as f, _decoding(args.file):
            response = session.append_text(f)
    if not response.appended_chars:  # e.g. a download that failed and left an empty file
        source = "--text" if args.text is not None else _source_name(args.file or "-")
        raise UsageError(f"no input text: {source} is empty; nothing was appended")
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
    data = client.session(args.id).export(path, weights_only=args.weights_only)
    out.obj({"session_id": args.id, "path": path, "bytes": len(data)})
    what = "the weights of " if args.weights_only else ""
    out.line(f"exported {what}{args.id} to {path} ({len(data):,} bytes)")
    return EXIT_OK


def cmd_convert(client: Client, args: argparse.Namespace, out: Output) -> int:
    """Offline: the client (and its server) is not used."""
    output = args.output or str(Path(args.archive).with_suffix(".onnx"))
    if Path(output).resolve() == Path(args.archive).resolve():
        raise UsageError(f"the output {output} is the archive itself: name another OUTPUT")
    try:
        from rnnserve.convert import to_onnx  # numpy and onnx: the onnx extra
    except ImportError as e:
        print(
            f"{PROG}: error: convert needs the onnx extra: pip install 'rnnserve[onnx]' ({e})",
            file=sys.stderr,
        )
        return EXIT_ERROR
    model = to_onnx(args.archive, output)
    props = {p.key: p.value for p in model.metadata_props}
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    out.obj({"archive": args.archive, "path": output, "inputs": inputs, "outputs": outputs})
    out.line(
        f"converted {args.archive} to {output}: {props['num_layers']}-layer {props['cell']}, "
        f"hidden {props['hidden_size']}, {len(props['alphabet'])} characters; inputs "
        f"{', '.join(inputs)}; outputs {', '.join(outputs)}"
    )
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
            # No connection at all (not a server that answers NOT_SERVING): say how to start one.
            hint = f"; {start_hint(args.address)}" if "(unreachable)" in e.details else ""
            print(f"{PROG}: unavailable: {e.details}{hint}", file=sys.stderr)
            return EXIT_UNAVAILABLE
        status = "SERVING"
    else:
        status = client.health(args.service)
    out.obj({"status": status})
    out.line(status)
    return EXIT_OK if status == "SERVING" else EXIT_UNAVAILABLE


def cmd_completion(client: Client, args: argparse.Namespace, out: Output) -> int:
    out.stream.write(completion.BASH_SCRIPT)
    return EXIT_OK
