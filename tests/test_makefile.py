"""`make test` on a fresh machine: it sets up everything the tests need before running them.

A fresh clone is stood in for by a copy of the Makefile and the files its install steps
depend on, with no .venv and no node_modules; ``make -n`` prints what ``make test`` would run
there, in order, without running it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What the Makefile's install rules depend on (their timestamps decide what is rebuilt).
INPUTS = ["Makefile", "pyproject.toml", "client/pyproject.toml", "server/pyproject.toml"]
INPUTS += ["server/setup.py"]
INPUTS += ["package.json", "package-lock.json"]


def dry_run(tmp_path: Path, target: str) -> list[str]:
    """The commands `make -n TARGET` prints in a fresh copy (no .venv, no node_modules)."""
    for name in INPUTS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    result = subprocess.run(
        ["make", "-n", target],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def first(lines: list[str], text: str) -> int:
    found = [i for i, line in enumerate(lines) if text in line]
    assert found, f"{text!r} not in:\n" + "\n".join(lines)
    return found[0]


def test_make_test_installs_everything_before_running_the_tests(tmp_path: Path) -> None:
    lines = dry_run(tmp_path, "test")
    pytest_at = first(lines, ".venv/bin/pytest")
    for step in ("-m venv .venv", "pip install", "npm install", "dpkg-query", "apt-get install"):
        assert first(lines, step) < pytest_at, step
    for package in deb_deps():  # the Debian services the tests run
        assert package in "\n".join(lines[:pytest_at])


def test_make_install_gets_a_c_compiler_before_pip_builds_the_kernel(tmp_path: Path) -> None:
    """pip compiles the server's engine kernel (a C extension): on a fresh machine without cc
    or Python's headers, apt-get installs them first."""
    lines = dry_run(tmp_path, "install")
    pip_at = first(lines, "pip install -q -e")
    check = "\n".join(lines[first(lines, "command -v cc") : pip_at])
    for step in ("gcc libc6-dev", "Python.h", "python3-dev", "apt-get install"):
        assert step in check, step


def deb_deps() -> list[str]:
    """The Makefile's list of Debian packages (DEB_DEPS)."""
    makefile = (ROOT / "Makefile").read_text()
    (line,) = [x for x in makefile.splitlines() if x.startswith("DEB_DEPS :=")]
    return line.split(":=")[1].split()


def test_make_help_names_every_debian_package() -> None:
    help_text = subprocess.run(
        ["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    (deps_line,) = [x for x in help_text.splitlines() if x.split()[:2] == ["make", "deps"]]
    assert {"redis-server", "nginx"} <= set(deb_deps())
    for package in deb_deps():
        assert package in deps_line, deps_line


def test_ci_needs_no_separate_deps_step() -> None:
    steps = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "make test" in "\n".join(steps)
    assert not [line for line in steps if line.strip().startswith("make deps")]
