"""The README's Quickstart runs as written, and so does "Change settings, fork, export and
import" after it.

Every ``sh`` and ``python`` block of those sections is run in order by one fresh, non-login
``bash`` (``python`` blocks through ``python - <<EOF``; the fragments of the second section get
the ``client`` and ``s`` they are documented to use), in a fresh directory that looks like
the clone (its top-level entries are symlinks to this checkout, so ``make`` and ``.venv`` are
the real ones), against the fresh server the README itself starts with ``make run``. The only
things the test sets are where that server listens (``ADDRESS`` for ``make run`` and
``RNNSERVE_ADDRESS`` for the client: a free port, so parallel runs don't collide) and a proxy
that refuses every connection: the machine is offline as far as the README can tell (tests
don't use the network), so its ``curl`` of tiny Shakespeare fails and the README's offline
line writes ``input.txt``. ``PATH`` has no virtualenv on it: the README has to put
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
QUICKSTART = "## Quickstart"
FRAGMENTS = "### Change settings, fork, export and import"
# What the fragments' "`client` and `s` as in the Library block above" stand for.
FRAGMENT_PRELUDE = """\
from rnnserve import Client
client = Client(timeout=30)
s = client.session("shakespeare")
"""


def section_blocks(readme: str, heading: str) -> list[tuple[str, str]]:
    """(language, code) of every ```sh / ```python block under ``heading``, up to the next
    heading of its level or above (lines in code blocks are not headings)."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = readme.splitlines(keepends=True)
    assert heading + "\n" in lines, f"README has no {heading!r} section"
    section: list[str] = []
    in_code = False
    for line in lines[lines.index(heading + "\n") + 1 :]:
        in_code ^= line.startswith("```")
        if not in_code and re.match(rf"#{{1,{level}}} ", line):
            break
        section.append(line)
    blocks = re.findall(r"^```(sh|python)\n(.*?)^```$", "".join(section), re.S | re.M)
    return [(language, code) for language, code in blocks]


def readme_blocks(readme: str) -> list[tuple[str, str]]:
    """The Quickstart's blocks, then the settings section's with the prelude they assume."""
    fragments = [
        (language, FRAGMENT_PRELUDE + code if language == "python" else code)
        for language, code in section_blocks(readme, FRAGMENTS)
    ]
    return section_blocks(readme, QUICKSTART) + fragments


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
        and k.lower() not in ("no_proxy", "all_proxy", "grpc_proxy", "no_grpc_proxy")
    }
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(":") if p and ".venv" not in p]
    env["PATH"] = ":".join(path)
    env["ADDRESS"] = f"127.0.0.1:{port}"  # `make run` listens here (ADDRESS ?= in the Makefile)
    env["RNNSERVE_ADDRESS"] = env["ADDRESS"]  # the CLI and Client() connect here
    # Offline: every download goes to a proxy port nothing listens on; gRPC reads these
    # variables too, and no_grpc_proxy (which curl ignores) keeps its loopback calls direct.
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        env[name] = f"http://127.0.0.1:{free_port()}"
    env["no_grpc_proxy"] = "127.0.0.1,localhost"
    return env


def test_quickstart_blocks_are_found() -> None:
    blocks = section_blocks((ROOT / "README.md").read_text(encoding="utf-8"), QUICKSTART)
    assert [language for language, _ in blocks] == ["sh", "python"]
    cli = blocks[0][1]
    assert "make run" in cli and "source .venv/bin/activate" in cli
    fragments = section_blocks((ROOT / "README.md").read_text(encoding="utf-8"), FRAGMENTS)
    assert [language for language, _ in fragments] == ["sh", "python", "python"]


@pytest.mark.timeout(600)
def test_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    blocks = readme_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    work = tmp_path / "clone"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in MADE:
            (work / entry.name).symlink_to(entry)
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
    assert re.search(r"^wrote input\.txt: [\d,]+ characters of Python source", stdout, re.M)
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
    # generate_stream's text ends with a newline: the next print starts a line of its own.
    assert re.search(r"^\d+ updates; last: \d+ ", stdout, re.M), context
    assert "SessionExists" not in stderr
    # The settings section after it: its CLI import and its Python import use their own ids.
    assert re.search(r"^exported shakespeare to model\.rnn ", stdout, re.M), context
    assert re.search(r"^sh-imported$", stdout, re.M), context


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


def test_what_the_quickstart_makes_is_ignored_by_git() -> None:
    names = [
        "input.txt",
        "more.txt",
        "model.rnn",
        "weights.rnn",
        "server.log",
        "data/sessions/x.npz",
    ]
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", *names],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.stdout.split() == names, result.stdout + result.stderr
