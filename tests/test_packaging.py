"""What the installed packages say about themselves: versions from their metadata."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest
import rnnserve
import rnnserve_server

pytestmark = pytest.mark.timeout(60)


def test_versions_come_from_the_package_metadata() -> None:
    assert rnnserve.__version__ == version("rnnserve") != "0+unknown"
    assert rnnserve_server.__version__ == version("rnnserve-server") != "0+unknown"


@pytest.mark.parametrize(
    ("module", "prog", "package"),
    [
        ("rnnserve", "rnnserve", "rnnserve"),
        ("rnnserve_server", "rnnserve-server", "rnnserve-server"),
    ],
)
def test_version_flag(module: str, prog: str, package: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{prog} {version(package)}\n"
