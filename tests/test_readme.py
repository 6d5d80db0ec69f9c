"""The README's Quickstart runs as written.

Every ``sh`` and ``python`` block under "## Quickstart" is run in order by one fresh, non-login
``bash`` (``python`` blocks through ``python - <<EOF``), in a fresh directory that looks like
the clone (its top-level entries are symlinks to this checkout, so ``make`` and ``.venv`` are
the real ones), against the fresh server the README itself starts with ``make run``. The only
things the test sets are where that server listens (``ADDRESS`` for ``make run`` and
``RNNSERVE_ADDRESS`` for the client: a free port, so parallel runs don't collide) and a proxy
that refuses every connection: the machine is offline as far as the README can tell (tests
don't use the network), so its ``curl`` of tiny Shakespeare fails and the README's offline
line writes ``input.txt``. ``PATH`` has no virtualenv on it: the README has to put
``rnnserve`` there. (tests/doc_runner.py runs the blocks; tests/test_docs.py runs docs/, where
the README's other sections moved.)
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.doc_runner import ROOT, clean_env, clone_in, fenced_blocks, run_script, script_from


def quickstart_blocks(readme: str) -> list[tuple[str, str]]:
    """(language, code) of every ```sh / ```python block in the Quickstart section."""
    match = re.search(r"^## Quickstart\n(.*?)(?=^## )", readme, re.S | re.M)
    assert match, "README has no '## Quickstart' section"
    blocks = fenced_blocks(match.group(1))
    return [(b.language, b.code) for b in blocks if b.language in ("sh", "python")]


def test_quickstart_blocks_are_found() -> None:
    blocks = quickstart_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert [language for language, _ in blocks] == ["sh", "python"]
    cli = blocks[0][1]
    assert "make run" in cli and "source .venv/bin/activate" in cli


@pytest.mark.timeout(600)
def test_readme_quickstart_runs_as_written(tmp_path: Path) -> None:
    blocks = quickstart_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    work = clone_in(tmp_path / "clone", input_text=None)
    env = clean_env()
    # Not found before the README's own setup: the test can't pass by our PATH.
    probe = subprocess.run(
        ["bash", "-c", "command -v rnnserve"], env=env, capture_output=True, check=False
    )
    assert probe.returncode != 0, probe.stdout

    run = run_script(script_from(blocks), work, env, timeout=540, logs=tmp_path)
    stdout, stderr, context = run.stdout, run.stderr, run.context()
    assert run.code == 0, context

    # The defects the README walk-through found, one by one.
    assert "SERVING" in stdout, context  # `rnnserve` was on PATH after the README's setup
    assert re.search(r"^wrote input\.txt: [\d,]+ characters of Python source", stdout, re.M)
    assert '"event"' not in stdout and '"event"' not in stderr, context  # logs in server.log
    assert "serving" in (work / "server.log").read_text()
    assert re.search(r"^predicted: ", stdout, re.M), context
    assert "ROMEO:" in stdout  # generate prints its prime first
    assert re.search(r"appended 20,000 chars to shakespeare", stdout), context
    assert re.search(
        r"^ID +STATE +CELL +LAYERS +HIDDEN +OPTIMIZER +STEP +LOSS +VAL_LOSS +CHARS/S +CREATED"
        r" +CHECKPOINTED$",
        stdout,
        re.M,
    )
    assert "deleted hallo" in stdout
    assert re.search(r"^latest: \d+ ", stdout, re.M), context  # the Library snippet finished
    # generate_stream's text ends with a newline: the next print starts a line of its own.
    assert re.search(r"^\d+ updates; last: \d+ ", stdout, re.M), context
    assert "SessionExists" not in stderr


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
