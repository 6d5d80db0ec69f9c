"""Watchers through nginx survive the death or drain of the replica they watch on (issue 19:
"a watcher on any replica sees one announced rollback and every step"). nginx routes by
x-session-id, so a job's watchers land on its owner; when that owner is killed or drained,
``job.follow()``, ``job.wait()``, ``session.watch_loss()`` and ``rnnserve attach`` reconnect
by themselves and go on after the last step they delivered. Real redis-server, nginx and
rnnserve-server replicas, as in test_cluster_jobs.py."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from rnnserve import Client
from rnnserve.v1 import rnn_service_pb2 as pb

from tests.cli_runner import cli_env
from tests.test_cluster import start_replicas, wait_until
from tests.test_cluster_jobs import start_job
from tests.test_failover import owner_of, published

if TYPE_CHECKING:
    from tests.cluster_fixtures import NginxFactory, RedisProcess
    from tests.conftest import ServerFactory


class Watchers:
    """Through one address: ``job.follow()``, ``job.wait()`` and ``session.watch_loss(1)``,
    each in a thread, and ``rnnserve --json attach`` in a subprocess."""

    def __init__(self, address: str, name: str, target: int) -> None:
        self.session_id = name.split("/")[1]
        self.name = name
        self.target = target
        self.client = Client(address, timeout=30)
        self.reports: list[int] = []  # follow(): the steps of the progress reports
        self.follow_rollbacks: list[int] = []
        self.followed: pb.Job | None = None
        self.waited: pb.Job | None = None
        self.points: list[int] = []  # watch_loss(): the steps of the points
        self.loss_rollbacks: list[int] = []
        self.errors: list[BaseException] = []
        self.attach = subprocess.Popen(
            [sys.executable, "-m", "rnnserve", "--address", address, "--json", "attach", self.session_id],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        self.attached: list[dict[str, Any]] = []
        self.threads = [
            threading.Thread(target=self._guarded, args=(f,), daemon=True)
            for f in (self._follow, self._wait, self._watch_loss, self._read_attach)
        ]
        for thread in self.threads:
            thread.start()

    def _guarded(self, run: Any) -> None:
        try:
            run()
        except BaseException as error:  # reported by the test
            self.errors.append(error)

    def _job(self) -> Any:
        return self.client.session(self.session_id).job(self.name)

    def _follow(self) -> None:
        stream = self._job().follow()
        for progress in stream:
            self.reports.append(progress.step)
        self.follow_rollbacks = list(stream.rollbacks)
        self.followed = stream.job

    def _wait(self) -> None:
        self.waited = self._job().wait()

    def _watch_loss(self) -> None:
        with self.client.session(self.session_id).watch_loss(1) as stream:
            for point in stream:
                self.points.append(point.step)
                if point.step >= self.target:
                    break
            self.loss_rollbacks = list(stream.rollbacks)

    def _read_attach(self) -> None:
        assert self.attach.stdout is not None
        for line in self.attach.stdout:
            self.attached.append(json.loads(line))

    def saw_progress(self) -> bool:
        return len(self.points) > 100 and bool(self.reports) and bool(self.attached)

    def finish(self) -> str:
        """Wait for every watcher to end; attach's stderr."""
        self.attach.wait(60)  # its stdout is read by a thread; stderr has a few lines
        for thread in self.threads:
            thread.join(60)
        self.client.close()
        assert self.attach.stderr is not None
        return self.attach.stderr.read()

    def close(self) -> None:
        self.attach.kill()
        self.client.close()


def in_order(steps: list[int], rollbacks: list[int], target: int, *, every: bool) -> None:
    """``steps`` rise to ``target``, going back once to each of ``rollbacks``' steps (and
    then repeating the steps after it); with ``every``, without a gap."""
    runs: list[list[int]] = [[]]
    for step in steps:
        if runs[-1] and step == runs[-1][-1]:
            continue  # a final message repeats its last report's step
        if runs[-1] and step < runs[-1][-1]:
            runs.append([])
        runs[-1].append(step)
    assert len(runs) == len(rollbacks) + 1, (rollbacks, [(r[0], r[-1]) for r in runs])
    assert runs[-1][-1] == target
    for run, back in zip(runs[1:], rollbacks, strict=True):
        assert run[0] > back
    if every:
        assert runs[0][0] == 1
        for run, back in zip(runs[1:], rollbacks, strict=True):
            assert run[0] == back + 1
        for run in runs:
            assert run == list(range(run[0], run[-1] + 1))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["kill", "drain"])
def test_watchers_through_nginx_follow_the_job_when_its_owner_dies_or_drains(
    how: str,
    server_factory: ServerFactory,
    redis_server: RedisProcess,
    nginx_factory: NginxFactory,
    tmp_path: Path,
) -> None:
    # No checkpoint during the job but StartJob's: a kill -9 rolls the job back to step 0.
    replicas = start_replicas(
        server_factory, redis_server, tmp_path / "shared", checkpoint_interval=600
    )
    nginx = nginx_factory([r.address for r in replicas])
    target = 3000
    name = start_job(nginx.address, "w", target)
    owner = owner_of(replicas, redis_server, "w")
    watchers = Watchers(nginx.address, name, target)  # x-session-id: nginx sends them to owner
    try:
        wait_until(lambda: watchers.saw_progress() or bool(watchers.errors), 30, "the watchers")
        assert not watchers.errors
        if how == "kill":
            owner.kill()
        else:
            assert owner.stop() == 0
        err = watchers.finish()
    finally:
        watchers.close()
    assert not watchers.errors, watchers.errors
    most = 1 if how == "kill" else 0  # a drain loses no step
    # watch_loss: every step, in order; a rollback announced and its steps shown again.
    assert len(watchers.loss_rollbacks) <= most
    in_order(watchers.points, watchers.loss_rollbacks, target, every=True)
    # follow(): the reports in order to the end, the ended job.
    assert len(watchers.follow_rollbacks) <= most
    in_order(watchers.reports, watchers.follow_rollbacks, target, every=False)
    assert watchers.followed is not None and watchers.followed.state == pb.JOB_STATE_SUCCEEDED
    # wait(): the finished job.
    assert watchers.waited is not None
    assert watchers.waited.state == pb.JOB_STATE_SUCCEEDED
    assert watchers.waited.step == target
    # attach: the reports, then the ended job; it said once that it reconnected.
    assert watchers.attach.returncode == 0, err
    *reports, ended = watchers.attached
    assert ended["state"] == "JOB_STATE_SUCCEEDED" and int(ended["step"]) == target
    rollbacks = [
        int(line.split("went back to step ")[1].split()[0])
        for line in err.splitlines()
        if "went back to step" in line
    ]
    assert len(rollbacks) <= most
    in_order([int(r["step"]) for r in reports], rollbacks, target, every=False)
    assert err.count("reconnected") == 1, err
    assert published(redis_server, "w") >= target
