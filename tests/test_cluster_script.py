"""`make cluster` (scripts/cluster.sh) as a user runs it: real redis-server, replicas and nginx
on free loopback ports, its state in a temporary CLUSTER_DIR.

A taken port stops it with the reason before anything starts; docs/cluster.md's block
(create, train, kill -9 a replica by the pid file in CLUSTER_DIR, `make cluster-restart`) runs
as written; the script's SIGTERM stops everything, the restarted replica too.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rnnserve import Client
from rnnserve_server.testing import find_binary

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "cluster.sh"


def free_run(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that were all free a moment ago."""
    for _ in range(100):
        base = random.randrange(20_000, 60_000)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return base
    raise AssertionError(f"no {count} consecutive free ports found")


def cluster_env(directory: Path) -> dict[str, str]:
    """The environment of a shell that runs `make cluster` with its own ports and directory."""
    find_binary("redis-server")  # not installed: the test fails, saying `make deps`
    find_binary("nginx")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RNNSERVE_", "MAKE", "MFLAGS"))}
    bindir = str(Path(sys.executable).parent)  # rnnserve and rnnserve-server, as after activate
    env["PATH"] = f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}:/usr/sbin"
    env["CLUSTER_DIR"] = str(directory)
    env["SERVER"] = str(Path(bindir) / "rnnserve-server")
    env["PORT"], env["REDIS_PORT"] = str(free_run(1)), str(free_run(1))
    env["REPLICA_BASE_PORT"], env["METRICS_BASE_PORT"] = str(free_run(3)), str(free_run(3))
    return env


def test_a_taken_port_stops_it_with_the_reason(tmp_path: Path) -> None:
    env = cluster_env(tmp_path / "cluster")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(env["PORT"])))
        taken.listen()
        result = subprocess.run(
            ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120, check=False
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"port {env['PORT']} (nginx) is in use" in result.stderr, result.stderr
    assert "PORT=" in result.stderr  # the setting that moves it
    assert not (tmp_path / "cluster").exists()  # nothing was started


@contextlib.contextmanager
def running_cluster(env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """scripts/cluster.sh in the foreground, until it says it is up; SIGTERM at the end."""
    script = subprocess.Popen(
        ["bash", str(SCRIPT)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert script.stdout is not None
    said = ""
    try:
        for line in script.stdout:  # ends if the script exits
            said += line
            if "Ctrl-C stops" in line:
                break
        assert "Ctrl-C stops" in said, said
        yield script
    finally:
        if script.poll() is None:
            script.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            script.communicate(timeout=60)
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()


def cluster_block() -> str:
    """docs/cluster.md's shell block of the cluster walk-through."""
    guide = (ROOT / "docs" / "cluster.md").read_text(encoding="utf-8")
    blocks: list[str] = re.findall(r"^```sh\n(.*?)^```$", guide, re.S | re.M)
    (block,) = [b for b in blocks if "make cluster-restart" in b]
    return block


def alive(pid: int) -> bool:
    """The process runs (a zombie, killed but not yet reaped by its parent, does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "State:\tZ" not in status


def test_the_guides_block_kills_and_restarts_a_replica(tmp_path: Path) -> None:
    directory = tmp_path / "cluster"
    env = cluster_env(directory)
    replica2 = f"127.0.0.1:{int(env['REPLICA_BASE_PORT']) + 1}"
    with running_cluster(env) as script:
        first = int((directory / "replica2.pid").read_text())
        result = subprocess.run(
            ["bash", "-c", "set -eo pipefail\n" + cluster_block()],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "replica2 is back" in result.stdout, result.stdout
        assert not alive(first)  # the kill -9 found the pid file in CLUSTER_DIR
        second = int((directory / "replica2.pid").read_text())
        assert second != first and alive(second)
        with Client(replica2) as client:
            assert client.health() == "SERVING"
        pids = [int((directory / f"replica{n}.pid").read_text()) for n in (1, 2, 3)]
        pids.append(int((directory / "nginx" / "nginx.pid").read_text()))

        script.send_signal(signal.SIGTERM)
        script.communicate(timeout=60)
        assert script.returncode == 143
    still = [pid for pid in pids if alive(pid)]
    assert not still, f"left running: {still}"
