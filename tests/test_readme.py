"""The README's Quickstart runs as written.

Every ``sh`` and ``python`` block under "## Quickstart" is run in order by one fresh, non-login
``bash`` (``python`` blocks through ``python - <<EOF``), in a fresh directory that looks like
the clone (its top-level entries are symlinks to this checkout, so ``make`` and ``.venv`` are
the real ones), against the fresh server the README itself starts with ``make run``. The only
things the test sets are where that server listens (``ADDRESS`` for ``make run`` and
``RNNSERVE_ADDRESS`` for the client: a free port, so parallel runs don't collide) and an
``input.txt`` of Shakespeare-like text (the README downloads tiny Shakespeare when there is
none; tests don't use the network). ``PATH`` has no virtualenv on it: the README has to put
``rnnserve`` there.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from rnnserve_server.testing import free_port

ROOT = Path(__file__).resolve().parent.parent
# Files the Quickstart makes; never linked from the checkout.
MADE = {"input.txt", "more.txt", "server.log", "data", "loss.png", "loss.csv"}

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


def quickstart_blocks(readme: str) -> list[tuple[str, str]]:
    """(language, code) of every ```sh / ```python block in the Quickstart section."""
    match = re.search(r"^## Quickstart\n(.*?)(?=^## )", readme, re.S | re.M)
    assert match, "README has no '## Quickstart' section"
    blocks = re.findall(r"^```(sh|python)\n(.*?)^```$", match.group(1), re.S | re.M)
    return [(language, code) for language, code in blocks]


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


def clean_env(port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RNNSERVE_", "VIRTUAL_ENV", "PYTHON", "MAKE", "MFLAGS"))
    }
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(":") if p and ".venv" not in p]
    env["PATH"] = ":".join(path)
    env["ADDRESS"] = f"127.0.0.1:{port}"  # `make run` listens here (ADDRESS ?= in the Makefile)
    env["RNNSERVE_ADDRESS"] = env["ADDRESS"]  # the CLI and Client() connect here
    return env


def test_quickstart_blocks_are_found() -> None:
    blocks = quickstart_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert [language for language, _ in blocks] == ["sh", "python"]
    cli = blocks[0][1]
    assert "make run" in cli and "source .venv/bin/activate" in cli


@pytest.mark.timeout(600)
def test_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    blocks = quickstart_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    work = tmp_path / "clone"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in MADE:
            (work / entry.name).symlink_to(entry)
    (work / "input.txt").write_text(VERSES * 60, encoding="utf-8")
    script = tmp_path / "quickstart.sh"
    script.write_text(script_from(blocks), encoding="utf-8")
    env = clean_env(free_port())
    # Not found before the README's own setup: the test can't pass by our PATH.
    probe = subprocess.run(
        ["bash", "-c", "command -v rnnserve"], env=env, capture_output=True, check=False
    )
    assert probe.returncode != 0, probe.stdout

    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        shell = subprocess.Popen(
            ["bash", str(script)],
            cwd=work,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group: the background server included
        )
        try:
            code = shell.wait(timeout=540)
        finally:
            stop_group(shell.pid)
    stdout = out_path.read_text(encoding="utf-8", errors="replace")
    stderr = err_path.read_text(encoding="utf-8", errors="replace")
    context = f"\n--- stdout ---\n{stdout[-4000:]}\n--- stderr ---\n{stderr[-4000:]}"
    assert code == 0, context

    # The defects the README walk-through found, one by one.
    assert "SERVING" in stdout, context  # `rnnserve` was on PATH after the README's setup
    assert '"event"' not in stdout and '"event"' not in stderr, context  # logs in server.log
    assert "serving" in (work / "server.log").read_text()
    assert re.search(r"^predicted: ", stdout, re.M), context
    assert "ROMEO:" in stdout  # generate prints its prime first
    assert re.search(r"appended 20,000 chars to shakespeare", stdout), context
    assert re.search(
        r"^ID +STATE +STEP +LOSS +HIDDEN +OPTIMIZER +CREATED +CHECKPOINTED$", stdout, re.M
    )
    assert "deleted hallo" in stdout
    assert re.search(r"^latest: \d+ ", stdout, re.M), context  # the Library snippet finished
    assert "SessionExists" not in stderr


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
