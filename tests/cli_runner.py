"""Run the CLI as a user does: ``python -m rnnserve`` in a subprocess, against a test server."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.conftest import ServerHandle


def cli_env() -> dict[str, str]:
    """Our environment without RNNSERVE_* settings (the tests pass what they mean),
    unbuffered so a child's output arrives as it is written."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def rnnserve(
    server: ServerHandle | None, *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -m rnnserve [--address <server>] ARGS...`, capturing stdout and stderr."""
    address = ["--address", server.address] if server is not None else []
    return subprocess.run(
        [sys.executable, "-m", "rnnserve", *address, *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        check=False,
    )


def train_in_background(
    server: ServerHandle, session_id: str, *flags: str
) -> subprocess.Popen[str]:
    """`rnnserve --json train ID FLAGS` for a million steps, one progress line per update on
    its stdout (read one to know training runs), its stderr piped: the process to Ctrl-C."""
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "rnnserve", "--address", server.address, "--json"),
            *("train", session_id, "--steps", "1000000", "--report-every", "1", *flags),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
