"""The CLI's training jobs: train --detach, jobs, attach (Ctrl-C detaches), stop, list."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest
from rnnserve.v1 import rnn_service_pb2 as pb

from tests.cli_runner import cli_env, rnnserve

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
pytestmark = pytest.mark.timeout(120)


def create(server: ServerHandle, session_id: str) -> None:
    result = rnnserve(server, "create", "--text", TEXT, "--id", session_id, "--hidden-size", "32")
    assert result.returncode == 0, result.stderr


def test_train_detach_prints_the_job_and_it_runs_to_its_end(module_server: ServerHandle) -> None:
    create(module_server, "cli-detach")
    started = rnnserve(module_server, "train", "cli-detach", "--steps", "300", "--detach")
    assert started.returncode == 0, started.stderr
    name = started.stdout.strip()
    assert name.startswith("sessions/cli-detach/jobs/")
    attached = rnnserve(module_server, "attach", "cli-detach", name.rsplit("/", 1)[1])
    assert attached.returncode == 0, attached.stderr
    assert "succeeded" in attached.stdout and "step 300/300" in attached.stdout
    listed = rnnserve(module_server, "jobs", "cli-detach")
    assert listed.returncode == 0 and listed.stdout.splitlines()[0].startswith("JOB")
    assert "succeeded" in listed.stdout and "completed" in listed.stdout


def test_job_flags_need_detach(module_server: ServerHandle) -> None:
    create(module_server, "cli-flags")
    result = rnnserve(module_server, "train", "cli-flags", "--steps", "10", "--warmup-steps", "5")
    assert result.returncode == 2 and "--detach" in result.stderr


def test_attach_ctrl_c_detaches_and_stop_stops(module_server: ServerHandle) -> None:
    create(module_server, "cli-attach")
    started = rnnserve(
        module_server,
        "train",
        "cli-attach",
        "--steps",
        "1000000",
        "--detach",
        "--report-every",
        "20",
    )
    assert started.returncode == 0, started.stderr
    listed = rnnserve(module_server, "list")
    assert "JOB" in listed.stdout.splitlines()[0] and "step " in listed.stdout
    shown = rnnserve(module_server, "show", "cli-attach")
    assert "job:" in shown.stdout and "sessions/cli-attach/jobs/" in shown.stdout
    attach = subprocess.Popen(
        [
            *(sys.executable, "-m", "rnnserve", "--address", module_server.address, "--json"),
            *("attach", "cli-attach"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert attach.stdout is not None
        json.loads(attach.stdout.readline())  # progress is arriving
        attach.send_signal(signal.SIGINT)
        _, err = attach.communicate(timeout=30)
    finally:
        attach.kill()
    assert attach.returncode == 130, err
    assert "detached" in err and "goes on" in err
    with module_server.client() as client:
        assert client.session("cli-attach").info().job.state == pb.JOB_STATE_RUNNING
    stopped = rnnserve(module_server, "stop", "cli-attach")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    with module_server.client() as client:
        info = client.session("cli-attach").info()
        assert info.state == pb.SESSION_STATE_READY and not info.HasField("job")
