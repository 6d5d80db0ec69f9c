"""The guides in docs/ run as written, and every link between the documents resolves.

Each docs/*.md is run as the README's Quickstart is (tests/doc_runner.py): its ``sh`` and
``python`` blocks in order, in one fresh ``bash`` in a directory that looks like the clone,
against a real server the test starts (``RNNSERVE_ADDRESS``), with the virtualenv on ``PATH``
as after the Quickstart's ``source .venv/bin/activate``. A block a test can't run (it needs
Docker, say) carries ``<!-- not run: REASON -->`` right before it; every other block must be
``sh`` or ``python``. docs/model-format.md is left to tests/test_model_format.py, which runs
its blocks for every cell against real archives. README blocks outside the Quickstart
(tests/test_readme.py runs that) must say why they don't run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.doc_runner import (
    ROOT,
    Block,
    clean_env,
    clone_in,
    fenced_blocks,
    run_script,
    script_from,
)

if TYPE_CHECKING:
    from tests.conftest import ServerFactory

RUN_ELSEWHERE = {"model-format.md"}  # tests/test_model_format.py
DOCS = sorted((ROOT / "docs").glob("*.md"))
GUIDES = [doc for doc in DOCS if doc.name not in RUN_ELSEWHERE]
RUNS = ("sh", "python")
# The state a guide starts from, where it builds on the Quickstart's: the server's settings and
# a shell prelude. training-jobs.md's jobs of 100,000 steps end after 3 s of training here.
SERVER_SETTINGS = {"training-jobs.md": {"max_job_seconds": 3}}
PRELUDE = {"training-jobs.md": "rnnserve create input.txt --id shakespeare"}
# What a guide's blocks say they print, checked after its run (each a line of the output).
PRINTS = {
    "api.md": [r"^SESSION_NOT_FOUND \{'session_id': 'nope'\}$"],
    "client.md": [
        r"^STOP_REASON_TARGET_LOSS ",  # validation: until_loss reached, from the CLI and Python
        r"^exported shakespeare to model\.rnn ",
        r"^sh-imported$",  # the CLI's import and the library's use their own ids
    ],
    "training-jobs.md": [r"^sessions/shakespeare/jobs/[0-9a-f]{12}$", r"\[time-limit\]$"],
}


def blocks_of(doc: Path) -> list[Block]:
    return fenced_blocks(doc.read_text(encoding="utf-8"))


def has_runnable_blocks(doc: Path) -> bool:
    return any(block.not_run is None for block in blocks_of(doc))


@pytest.mark.parametrize("doc", GUIDES, ids=lambda doc: doc.name)
def test_every_block_runs_or_says_why(doc: Path) -> None:
    for block in blocks_of(doc):
        where = f"{doc.name}:{block.line}"
        if block.not_run is None:
            assert block.language in RUNS, (
                f"{where}: a ```{block.language} block neither runs (sh, python) nor says why "
                "(<!-- not run: REASON --> on the line before it)"
            )
        else:
            assert block.not_run.strip(), f"{where}: 'not run' without a reason"


def test_readme_blocks_outside_the_quickstart_say_why_they_dont_run() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = re.search(r"^## Quickstart\n.*?(?=^## )", readme, re.S | re.M)
    assert quickstart
    outside = readme[: quickstart.start()] + readme[quickstart.end() :]
    for block in fenced_blocks(outside):
        assert block.not_run, f"README: a block outside the Quickstart doesn't say why: {block}"


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "doc", [doc for doc in GUIDES if has_runnable_blocks(doc)], ids=lambda doc: doc.name
)
def test_the_guide_runs_as_written(
    doc: Path, server_factory: ServerFactory, tmp_path: Path
) -> None:
    server = server_factory(**SERVER_SETTINGS.get(doc.name, {}))
    blocks = [(b.language, b.code) for b in blocks_of(doc) if b.not_run is None]
    if doc.name in PRELUDE:
        blocks.insert(0, ("sh", PRELUDE[doc.name] + "\n"))
    work = clone_in(tmp_path / "clone")
    env = clean_env(server.address)
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env['PATH']}"  # as after `source .venv/bin/activate`
    run = run_script(script_from(blocks), work, env, timeout=540, logs=tmp_path)
    assert run.code == 0, run.context()
    assert "Traceback" not in run.stderr, run.context()
    for line in PRINTS.get(doc.name, []):
        assert re.search(line, run.stdout, re.M), f"{line!r} not printed{run.context()}"


# Links: [text](target) outside code; a target with a scheme leaves the repository.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
LINKED_DOCS = [
    ROOT / "README.md",
    ROOT / "BENCHMARKS.md",
    *DOCS,
    *sorted((ROOT / "bench" / "history").glob("*.md")),
]


def without_blocks(markdown: str) -> str:
    """The text without fenced blocks (a shell comment is no heading, code holds brackets)."""
    return re.sub(r"^```.*?^```$", "", markdown, flags=re.S | re.M)


def prose(markdown: str) -> str:
    """The text without fenced blocks and inline code."""
    return re.sub(r"`[^`\n]*`", "", without_blocks(markdown))


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings (lowercase, punctuation dropped, spaces
    to hyphens; a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    result = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", without_blocks(markdown), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda doc: str(doc.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for target in LINK.findall(prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        assert linked.exists(), f"{doc.name}: {target} does not exist"
        assert linked.is_relative_to(ROOT), f"{doc.name}: {target} leaves the repository"
        if anchor:
            assert linked.suffix == ".md", f"{doc.name}: {target}: an anchor in a non-Markdown file"
            assert anchor in anchors(linked.read_text(encoding="utf-8")), (
                f"{doc.name}: {target}: no heading with that anchor"
            )


def test_every_server_setting_is_in_the_operations_table() -> None:
    """``rnnserve-server --help`` and docs/operations.md's Configuration table name the same
    settings (a new flag gets its row)."""
    import dataclasses

    from rnnserve_server.config import Settings

    table = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    rows = "\n".join(line for line in table.splitlines() if line.startswith("| `--"))
    missing = [
        f"--{f.name.replace('_', '-')}"
        for f in dataclasses.fields(Settings)
        if f"`--{f.name.replace('_', '-')}`" not in rows
    ]
    assert not missing, f"docs/operations.md's settings table has no row for {missing}"
