"""Argument types and the flag groups that several commands share."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from rnnserve.client import CELLS, DEFAULT_ADDRESS, DTYPES, OPTIMIZERS, PRESETS


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
    group.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="default",
        help="the starting settings (default: default); `rnnserve presets` says what each "
        "is for and what it measured",
    )
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
