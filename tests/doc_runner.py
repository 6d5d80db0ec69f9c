"""Running a Markdown document's code blocks as written (tests/test_readme.py, tests/test_docs.py).

The blocks run in order in one fresh, non-login ``bash``: ``sh`` blocks verbatim, ``python``
blocks through ``python - <<EOF``, in a fresh directory that looks like the clone (its
top-level entries are symlinks to this checkout, so ``make`` and ``.venv`` are the real ones)
(an ``input.txt`` of Shakespeare-like text in it if asked), offline: downloads go to a proxy
that refuses them (tests don't use the network). A block right after ``<!-- not run: REASON -->``
is one a test can't run (it needs Docker, say), and says why.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from rnnserve_server.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
# Files the documents make; never linked from the checkout.
MADE = {
    "input.txt",
    "more.txt",
    "server.log",
    "data",
    "loss.png",
    "loss.csv",
    "model.rnn",
    "weights.rnn",
}

VERSES = """\
ROMEO:
But, soft! what light through yonder window breaks?
It is the east, and Juliet is the sun.
Arise, fair sun, and kill the envious moon,
Who is already sick and pale with grief,
That thou her maid art far more fair than she.

JULIET:
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name;
Or, if thou wilt not, be but sworn my love,
And I'll no longer be a Capulet.

MERCUTIO:
Nay, gentle Romeo, we must have you dance.

FIRST CITIZEN:
Before we proceed any further, hear me speak.

ALL:
Speak, speak.

"""

_BLOCK = re.compile(
    r"^(?:<!-- not run: (?P<reason>[^\n]*?) -->\n)?```(?P<language>\S*)\n(?P<code>.*?)^```$",
    re.S | re.M,
)


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, its code, and why it is not run (None: it runs)."""

    language: str
    code: str
    not_run: str | None
    line: int  # where its fence opens, 1-based


def fenced_blocks(markdown: str) -> list[Block]:
    """Every fenced block of a Markdown text, in order."""
    return [
        Block(
            m["language"],
            m["code"],
            m["reason"],
            markdown.count("\n", 0, m.start("language")) + 1,
        )
        for m in _BLOCK.finditer(markdown)
    ]


def script_from(blocks: list[tuple[str, str]]) -> str:
    """One bash script: shell blocks verbatim, Python blocks fed to `python -` as heredocs."""
    parts = ["set -eo pipefail"]
    for language, code in blocks:
        if language == "sh":
            parts.append(code)
        else:
            assert "README_PY_EOF" not in code
            parts.append(f"python - <<'README_PY_EOF'\n{code}README_PY_EOF")
    return "\n".join(parts) + "\n"


def clone_in(work: Path, input_text: str | None = VERSES * 60) -> Path:
    """``work`` made to look like a fresh clone, with ``input_text`` (if any) as its
    ``input.txt``; returns ``work``."""
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in MADE:
            (work / entry.name).symlink_to(entry)
    if input_text is not None:
        (work / "input.txt").write_text(input_text, encoding="utf-8")
    return work


def clean_env(address: str | None = None) -> dict[str, str]:
    """Our environment, offline, without any virtualenv, rnnserve or make settings; ``ADDRESS``
    (for ``make run``) and ``RNNSERVE_ADDRESS`` (for the CLI and ``Client()``) set to
    ``address`` (default: a free loopback port)."""
    address = address or f"127.0.0.1:{free_port()}"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RNNSERVE_", "VIRTUAL_ENV", "PYTHON", "MAKE", "MFLAGS"))
        and k.lower() not in ("no_proxy", "all_proxy", "grpc_proxy", "no_grpc_proxy")
    }
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(":") if p and ".venv" not in p]
    env["PATH"] = ":".join(path)
    env["ADDRESS"] = address  # `make run` listens here (ADDRESS ?= in the Makefile)
    env["RNNSERVE_ADDRESS"] = address  # the CLI and Client() connect here
    # Offline: every download goes to a proxy port nothing listens on; gRPC reads these
    # variables too, and no_grpc_proxy (which curl ignores) keeps its loopback calls direct.
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        env[name] = f"http://127.0.0.1:{free_port()}"
    env["no_grpc_proxy"] = "127.0.0.1,localhost"
    return env


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    def context(self) -> str:
        return f"\n--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}"


def run_script(script: str, work: Path, env: dict[str, str], timeout: float, logs: Path) -> Run:
    """``script`` run by bash in ``work``, its output kept in ``logs``; whatever it started in
    the background (a server) is stopped with it."""
    path = logs / "script.sh"
    path.write_text(script, encoding="utf-8")
    out_path, err_path = logs / "stdout", logs / "stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        shell = subprocess.Popen(
            ["bash", str(path)],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group: a background server included
        )
        try:
            code = shell.wait(timeout=timeout)
        finally:
            stop_group(shell.pid)
    return Run(
        code,
        out_path.read_text(encoding="utf-8", errors="replace"),
        err_path.read_text(encoding="utf-8", errors="replace"),
    )


def stop_group(pgid: int) -> None:
    """SIGTERM the script's process group (make and the server it started), then wait."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)  # polling for the exit (a deadline-bounded wait, not a synchronisation)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
