"""Watchers through nginx survive the death or drain of the replica they watch on (issue 19:
"a watcher on any replica sees one announced rollback and every step"). nginx routes by
x-session-id, so a job's watchers land on its owner; when that owner is killed or drained,
``job.follow()``, ``job.wait()``, ``session.watch_loss()`` and ``rnnserve attach`` reconnect
by themselves and go on after the last step they delivered. Real redis-server, nginx and
rnnserve-server replicas, as in test_cluster_jobs.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from rnnserve import Client, RnnServeError, aio
from rnnserve._watch import JobWatch, LossWatch
from rnnserve.v1 import rnn_service_pb2 as pb

from tests.cli_runner import cli_env
from tests.test_cluster import wait_until
from tests.test_cluster_jobs import job_behind_nginx
from tests.test_failover import published

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
        self.aio_reports: list[int] = []  # the asyncio client's follow()
        self.aio_rollbacks: list[int] = []
        self.aio_waited: pb.Job | None = None
        self.aio_points: list[int] = []  # and its watch_loss()
        self.aio_loss_rollbacks: list[int] = []
        self.points: list[int] = []  # watch_loss(): the steps of the points
        self.loss_rollbacks: list[int] = []
        self.errors: list[BaseException] = []
        self.attach = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rnnserve",
                "--address",
                address,
                "--json",
                "attach",
                self.session_id,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        self.attached: list[dict[str, Any]] = []
        self.threads = [
            threading.Thread(target=self._guarded, args=(f,), daemon=True)
            for f in (self._follow, self._wait, self._watch_loss, self._read_attach, self._aio)
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

    def _aio(self) -> None:
        asyncio.run(self._aio_watch())

    async def _aio_watch(self) -> None:
        async with aio.Client(self.client.address, timeout=30) as client:
            session = client.session(self.session_id)
            job = await session.job(self.name)

            async def follow() -> None:
                stream = job.follow()
                async for progress in stream:
                    self.aio_reports.append(progress.step)
                self.aio_rollbacks = list(stream.rollbacks)
                self.aio_waited = await job.wait()

            async def watch_loss() -> None:
                async with session.watch_loss(1) as stream:
                    async for point in stream:
                        self.aio_points.append(point.step)
                        if point.step >= self.target:
                            break
                    self.aio_loss_rollbacks = list(stream.rollbacks)

            await asyncio.gather(follow(), watch_loss())

    def _read_attach(self) -> None:
        assert self.attach.stdout is not None
        for line in self.attach.stdout:
            self.attached.append(json.loads(line))

    def saw_progress(self) -> bool:
        return (
            len(self.points) > 100
            and len(self.aio_points) > 100
            and bool(self.reports)
            and bool(self.aio_reports)
            and bool(self.attached)
        )

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
    target = 3000
    _, nginx, name, owner = job_behind_nginx(
        server_factory, redis_server, nginx_factory, tmp_path, "w", target
    )
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
    # The asyncio client's, the same.
    assert len(watchers.aio_loss_rollbacks) <= most
    in_order(watchers.aio_points, watchers.aio_loss_rollbacks, target, every=True)
    assert len(watchers.aio_rollbacks) <= most
    in_order(watchers.aio_reports, watchers.aio_rollbacks, target, every=False)
    assert watchers.aio_waited is not None
    assert watchers.aio_waited.state == pb.JOB_STATE_SUCCEEDED
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


# -- the decisions (rnnserve._watch), without a server ----------------------------------------


def unavailable(reason: str | None = None) -> RnnServeError:
    return RnnServeError("cut off", grpc.StatusCode.UNAVAILABLE, reason=reason)


def test_a_loss_watch_resumes_after_its_last_point_and_after_a_rollback() -> None:
    watch = LossWatch("s", 1, retry_for=60, timeout=None)
    assert watch.request().from_step == 1
    points = pb.WatchLossResponse(points=[pb.LossPoint(step=s) for s in (1, 2, 3)])
    assert [p.step for p in watch.deliver(points)] == [1, 2, 3]
    assert watch.after(unavailable()) is not None
    assert watch.request().from_step == 4
    assert list(watch.deliver(pb.WatchLossResponse(restored_at_step=1))) == []
    assert watch.rollbacks == [1]
    again = pb.WatchLossResponse(points=[pb.LossPoint(step=s) for s in (2, 3, 4)])
    assert [p.step for p in watch.deliver(again)] == [2, 3, 4]  # the steps after it, again
    assert watch.request().from_step == 5


def test_a_job_watch_reports_a_rollback_once_and_drops_what_it_delivered() -> None:
    job = pb.Job(name="sessions/s/jobs/1", state=pb.JOB_STATE_RUNNING, step=0, target_step=100)

    def message(step: int, progress: int | None = None, **fields: Any) -> pb.WatchJobResponse:
        out = pb.WatchJobResponse(job=pb.Job(name=job.name, state=job.state, step=step))
        if progress is not None:
            out.progress.CopyFrom(pb.TrainResponse(step=progress, **fields))
        return out

    watch = JobWatch(job, retry_for=60, timeout=None)
    assert list(watch.deliver(message(0))) == []
    assert [p.step for p in watch.deliver(message(20, 20))] == [20]
    drained = message(25, 25, stop_reason=pb.STOP_REASON_SHUTDOWN)
    assert list(watch.deliver(drained)) == []  # it left that replica: not its end
    assert watch.after(None) is not None  # ended before the job: reconnect
    assert list(watch.deliver(message(25))) == []  # further on: no rollback
    assert list(watch.deliver(message(20, 20))) == []  # delivered already
    assert watch.after(unavailable()) is not None
    assert list(watch.deliver(message(5))) == []  # reconnected behind it: a rollback
    assert [p.step for p in watch.deliver(message(10, 10))] == [10]
    assert watch.rollbacks == [5]


def test_a_watch_gives_up_on_what_a_retry_would_repeat() -> None:
    watch = LossWatch("s", 1, retry_for=60, timeout=None)
    assert watch.after(RnnServeError("bad", grpc.StatusCode.INVALID_ARGUMENT)) is None
    assert watch.after(unavailable("NEWER_FORMAT")) is not None  # a newer replica will take it
    assert watch.after(RnnServeError("gone", grpc.StatusCode.NOT_FOUND)) is None
    assert watch.gone  # deleted while it reconnected: the end, quietly
    assert LossWatch("s", 1, retry_for=60, timeout=0).after(unavailable()) is None  # no time
    assert LossWatch("s", 1, retry_for=0, timeout=None).after(unavailable()) is None
