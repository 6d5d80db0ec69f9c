"""Cost of the canonical ``rpc`` log line (JSON, as the server writes one per RPC).

    .venv/bin/python bench/log_line.py [--lines N] [--rounds R]

Configures logging as the server does (``logs.configure("json")``), sends stderr to /dev/null
and times ``log.info("rpc", ...)`` with the fields the observing interceptor passes, request
context bound as in a call. Prints the best and median round in CPU microseconds per line
(process time: on a shared machine wall time mostly measures the neighbours).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from typing import Any

import structlog
from rnnserve_server import logs as installed_logs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--logs-file", help="time this copy of logs.py instead (an A/B against an old version)"
    )
    args = parser.parse_args()
    logs: Any = installed_logs
    if args.logs_file:
        spec = importlib.util.spec_from_file_location("logs_under_test", args.logs_file)
        assert spec is not None and spec.loader is not None
        logs = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(logs)
    real_stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    logs.configure("json", "info")
    log = logs.get_logger("rnnserve_server.interceptors")
    rounds = []
    for _ in range(args.rounds):
        start = time.process_time()
        for _ in range(args.lines):
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(session_id="s-1234")
            fields = structlog.contextvars.get_contextvars()
            log.info(
                "rpc",
                method="/rnnserve.v1.RnnService/Step",
                session_id=fields.get("session_id", ""),
                code="OK",
                duration_ms=1.234,
            )
        rounds.append((time.process_time() - start) / args.lines * 1e6)
    os.dup2(real_stderr, 2)
    print(
        f"rpc line: best {min(rounds):.2f} us, median {statistics.median(rounds):.2f} us "
        f"({args.rounds} rounds of {args.lines} lines, python {sys.version.split()[0]})"
    )


if __name__ == "__main__":
    main()
