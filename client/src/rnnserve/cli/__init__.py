"""The ``rnnserve`` command: a thin shell over :mod:`rnnserve.client`.

Each command builds a :class:`~rnnserve.Client`, calls one library method, prints the result
(as text, or one JSON object per line with ``--json``) and turns library errors into a
one-line message on stderr and an exit code (see :mod:`rnnserve.cli.exit_codes`).

Modules: :mod:`~rnnserve.cli.parser` (the argparse parser, its shared flags in
:mod:`~rnnserve.cli.flags`), :mod:`~rnnserve.cli.commands` (the one-call commands),
:mod:`~rnnserve.cli.training` (train, watch, plot), :mod:`~rnnserve.cli.output` (text and
JSON output, input files) and :mod:`~rnnserve.cli.exit_codes` (exception -> exit code).
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import os
import sys
from collections.abc import Sequence

from rnnserve import completion
from rnnserve.cli.exit_codes import (
    ERRORS,
    EXIT_CODES_HELP,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    PROG,
    UsageError,
    _error_line,
)
from rnnserve.cli.output import Output, message_to_dict
from rnnserve.cli.parser import build_parser
from rnnserve.client import Client
from rnnserve.errors import RnnServeError, SessionNotFound

__all__ = ["ERRORS", "EXIT_CODES_HELP", "build_parser", "main", "message_to_dict"]


def _complete(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    if not argv or not argv[0].isdigit():
        return EXIT_USAGE
    for word in completion.complete(parser, argv[1:], int(argv[0])):
        print(word)
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
        # Every path the CLI opens is one the user gave: a wrong one is a usage error.
        wrong_path = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
        return EXIT_USAGE if isinstance(e, wrong_path) else EXIT_ERROR
    except UnicodeDecodeError as e:
        print(f"{PROG}: error: the input is not UTF-8 text ({e.reason})", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
