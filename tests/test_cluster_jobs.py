"""Training jobs in a cluster, as users meet them (docs/training-jobs.md, "In a cluster"): jobs
that move with their sessions with no client connected (failover, drain, a free slot
elsewhere), job calls from any replica, and a checkpoint of a newer format during a rolling
upgrade. Real redis-server, nginx and rnnserve-server replicas, as in test_cluster.py."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from rnnserve import Client, RnnServeError
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

from tests.test_cluster import TEXT, redis_get, start_replicas, wait_until
from tests.test_failover import checkpointed, owner_of, published, restores

if TYPE_CHECKING:
    from tests.cluster_fixtures import NginxFactory, NginxProcess, RedisProcess
    from tests.conftest import ServerFactory, ServerHandle

pytestmark = pytest.mark.timeout(120)

ENDED = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_STOPPED, pb.JOB_STATE_FAILED)


def redis_jobs(redis: RedisProcess) -> list[str]:
    """The sessions Redis lists as having a queued or running job."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis.url, decode_responses=True)
    try:
        ids: Any = client.zrange("rnnserve:jobs", 0, -1)
    finally:
        client.close()
    return [str(i) for i in ids]


class Watcher:
    """WatchJob and WatchLoss on one replica, each in a thread, keeping every message."""

    def __init__(self, address: str, job_name: str, session_id: str) -> None:
        self.channel = grpc.insecure_channel(address)
        stub = pb_grpc.RnnServiceStub(self.channel)
        self.job_messages: list[pb.WatchJobResponse] = []
        self.loss_messages: list[pb.WatchLossResponse] = []
        self._job_call: Any = stub.WatchJob(pb.WatchJobRequest(name=job_name), timeout=100)
        self._loss_call: Any = stub.WatchLoss(
            pb.WatchLossRequest(session_id=session_id, from_step=1), timeout=100
        )
        self.errors: list[BaseException] = []
        self._threads = [
            threading.Thread(target=self._drain, args=(self._job_call, self.job_messages)),
            threading.Thread(target=self._drain, args=(self._loss_call, self.loss_messages)),
        ]
        for thread in self._threads:
            thread.start()

    def _drain(self, call: Any, into: list[Any]) -> None:
        try:
            for message in call:
                into.append(message)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.errors.append(exc)

    def saw_the_end(self, target: int) -> bool:
        """True once the WatchJob stream ended (or failed) and WatchLoss showed ``target``."""
        ended = bool(self.errors) or not self._threads[0].is_alive()
        return ended and self.loss_steps()[-1:] == [target]

    def saw_progress(self) -> bool:
        """True once both streams delivered progress (so a rollback is behind what they saw)."""
        job = any(m.HasField("progress") for m in self.job_messages)
        return job and bool(self.loss_steps())

    def loss_steps(self) -> list[int]:
        return [p.step for m in self.loss_messages for p in m.points]

    def close(self) -> None:
        self._job_call.cancel()
        self._loss_call.cancel()
        for thread in self._threads:
            thread.join(10)
        self.channel.close()


def start_job(address: str, session_id: str, target: int, request_id: str | None = None) -> str:
    """A new session trained by a job of ``target`` steps, started through ``address`` and
    left with no client connected; the job's name."""
    with Client(address, timeout=30) as client:
        session = client.create_session(TEXT, session_id=session_id, hidden_size=32, seed=1)
        return session.start_training(target, report_every=20, request_id=request_id).name


def job_behind_nginx(
    server_factory: ServerFactory,
    redis: RedisProcess,
    nginx_factory: NginxFactory,
    tmp_path: Path,
    session_id: str,
    target: int,
    request_id: str | None = None,
) -> tuple[list[ServerHandle], NginxProcess, str, ServerHandle]:
    """Three replicas that checkpoint a job only at its start (a kill -9 rolls it back to
    step 0), nginx in front, and a job of ``target`` steps started through nginx: the
    replicas, the nginx, the job's name and its owner."""
    replicas = start_replicas(server_factory, redis, tmp_path / "shared", checkpoint_interval=600)
    nginx = nginx_factory([r.address for r in replicas])
    name = start_job(nginx.address, session_id, target, request_id=request_id)
    return replicas, nginx, name, owner_of(replicas, redis, session_id)


def watch_once_trained(
    replica: ServerHandle, redis: RedisProcess, name: str, session_id: str
) -> Watcher:
    """Watchers on ``replica`` once the job put its first points on the session's stream (a
    WatchLoss on a replica that does not own the session follows the stream from then)."""
    wait_until(lambda: published(redis, session_id) > 0, 30, "the job's first points")
    return Watcher(replica.address, name, session_id)


def job_of(client: Client, name: str) -> pb.Job:
    return client.session(name.split("/")[1]).job(name).info


def wait_ended(client: Client, name: str, timeout: float = 60.0) -> pb.Job:
    """The job once GetJob (through ``client``) shows it ended."""
    seen: list[pb.Job] = []

    def ended() -> bool:
        try:
            seen.append(job_of(client, name))
        except RnnServeError:
            return False  # moving between replicas: asked again
        return seen[-1].state in ENDED

    wait_until(ended, timeout, f"job {name} to end")
    return seen[-1]


def check_one_rollback_then_every_step(watcher: Watcher, restored: int, target: int) -> None:
    """The watcher saw one announced rollback to ``restored``, and every step after it."""
    rollbacks = [
        m.restored_at_step for m in watcher.loss_messages if m.HasField("restored_at_step")
    ]
    assert rollbacks == [restored]
    steps = watcher.loss_steps()
    cut = steps.index(restored + 1, steps.index(restored + 1) + 1)  # where it repeats
    assert steps[cut:] == list(range(restored + 1, target + 1))
    job_rollbacks = [
        m.restored_at_step for m in watcher.job_messages if m.HasField("restored_at_step")
    ]
    assert job_rollbacks == [restored]
    after = watcher.job_messages[
        [m.HasField("restored_at_step") for m in watcher.job_messages].index(True) :
    ]
    progress = [m.progress.step for m in after if m.HasField("progress")]
    assert progress == sorted(progress) and progress[-1] == target
    assert watcher.job_messages[-1].job.state == pb.JOB_STATE_SUCCEEDED


@pytest.mark.timeout(90)
def test_a_job_goes_on_elsewhere_after_kill9_of_its_owner_with_no_client(
    server_factory: ServerFactory,
    redis_server: RedisProcess,
    nginx_factory: NginxFactory,
    tmp_path: Path,
) -> None:
    target = 3000
    replicas, _, name, owner = job_behind_nginx(
        server_factory, redis_server, nginx_factory, tmp_path, "k", target, request_id="k-1"
    )  # no client from here on
    other = next(r for r in replicas if r is not owner)
    watcher = watch_once_trained(other, redis_server, name, "k")
    try:
        # No checkpoint during the job but StartJob's (step 0): once watchers saw steps past
        # it, a kill makes the rollback certain, not a race with a periodic checkpoint.
        wait_until(
            lambda: published(redis_server, "k") > 100 and watcher.saw_progress(),
            30,
            "the job to train past its checkpoint",
        )
        checkpointed_before = checkpointed(redis_server, "k")
        owner.kill()
        with other.client(timeout=30) as client:
            ended = wait_ended(client, name)
        assert ended.state == pb.JOB_STATE_SUCCEEDED
        assert ended.step == ended.target_step == target
        assert ended.stop_reason == pb.STOP_REASON_COMPLETED
        wait_until(lambda: watcher.saw_the_end(target), 30, "the watchers to see the end")
        assert not watcher.errors
        (restored,) = restores(redis_server, "k")
        assert restored == checkpointed_before == 0
        check_one_rollback_then_every_step(watcher, restored, target)
        assert not watcher.errors
        with other.client(timeout=30) as client:
            session = client.session("k")
            assert session.info().step == target  # never past its target
            # StartJob retried after the failover: the same job, not a new one.
            assert session.start_training(target, request_id="k-1").name == name
        assert redis_jobs(redis_server) == []  # it ended: out of the set
        # A watcher that saw the dead owner's steps and reconnects to the new owner itself
        # (through nginx it may land there) is told of the rollback too, and shown the
        # retrained steps again.
        new_owner = owner_of([r for r in replicas if r is not owner], redis_server, "k")
        with (
            new_owner.client(timeout=30) as client,
            client.session("k").watch_loss(from_step=100) as stream,
        ):
            before = []  # the dead owner's steps from 100, then the rollback
            for point in stream:
                if stream.rollbacks or point.step >= target:
                    break
                before.append(point.step)
            assert stream.rollbacks == [restored]
            assert point.step == restored + 1
            assert before == list(range(100, 100 + len(before)))
    finally:
        watcher.close()


@pytest.mark.timeout(90)
def test_sigterm_of_the_owner_moves_its_job_with_no_step_lost(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    replicas = start_replicas(server_factory, redis_server, tmp_path / "shared")
    owner, other = replicas[0], replicas[1]
    target = 2500
    name = start_job(owner.address, "d", target)
    watcher = watch_once_trained(other, redis_server, name, "d")
    try:
        wait_until(lambda: published(redis_server, "d") > 200, 30, "the job to train")
        assert owner.stop() == 0  # drain: the job stops at a boundary, checkpointed
        with other.client(timeout=30) as client:
            ended = wait_ended(client, name)
        assert ended.state == pb.JOB_STATE_SUCCEEDED
        assert ended.step == target
        assert ended.steps_done == target  # every step the job made is kept
        wait_until(lambda: watcher.saw_the_end(target), 30, "the watchers to see the end")
        assert not watcher.errors
        assert restores(redis_server, "d") == []  # no rollback
        assert watcher.loss_steps() == list(range(1, target + 1))
        assert not any(m.HasField("restored_at_step") for m in watcher.job_messages)
        assert not any(m.HasField("restored_at_step") for m in watcher.loss_messages)
        assert watcher.job_messages[-1].job.state == pb.JOB_STATE_SUCCEEDED
        assert not watcher.errors
        moved = [e for e in owner.logs if e.get("event") == "train_finished"]
        assert moved and moved[-1]["stop_reason"] == "shutdown"
    finally:
        watcher.close()


@pytest.mark.timeout(60)
def test_job_calls_work_from_a_replica_that_does_not_own_the_session(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    owner, other = start_replicas(server_factory, redis_server, tmp_path / "shared", count=2)
    with owner.client(timeout=30) as client:
        client.create_session(TEXT, session_id="s", hidden_size=32, seed=1)
    with other.client(timeout=30) as client:
        session = client.session("s")
        job = session.start_training(10**6, report_every=10, request_id="start-1")
        name = job.name
        assert owner_of([owner, other], redis_server, "s") is owner  # it runs on the owner
        assert redis_jobs(redis_server) == ["s"]
        again = session.start_training(10**6, request_id="start-1")  # a retry: the same job
        assert again.name == name
        assert job.refresh().state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
        assert [j.name for j in session.jobs()] == [name]
        stopped = job.stop()
        assert stopped.state == pb.JOB_STATE_STOPPED
        assert stopped.stop_reason == pb.STOP_REASON_STOPPED
    with owner.client(timeout=30) as client:
        assert job_of(client, name).state == pb.JOB_STATE_STOPPED
    assert redis_jobs(redis_server) == []


@pytest.mark.timeout(120)
def test_six_jobs_on_three_replicas_with_one_slot_each_share_the_slots(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    replicas = start_replicas(server_factory, redis_server, tmp_path / "shared", max_running_jobs=1)
    names = []
    with replicas[0].client(timeout=30) as client:  # all six start on one replica
        for i in range(6):
            session = client.create_session(TEXT, session_id=f"f{i}", hidden_size=64, seed=i)
            names.append(session.start_training(1500, report_every=50).name)
    with replicas[1].client(timeout=30) as client:
        jobs = [wait_ended(client, name, timeout=100) for name in names]
    assert [j.state for j in jobs] == [pb.JOB_STATE_SUCCEEDED] * 6
    assert [j.step for j in jobs] == [1500] * 6
    # Three slots in the cluster: the jobs' training time, spread over them, is the time the
    # six took from first start to last end, unless a slot stayed free while a job waited.
    begin = min(j.create_time.ToMicroseconds() for j in jobs) / 1e6
    end = max(j.end_time.ToMicroseconds() for j in jobs) / 1e6
    busy = sum(j.seconds_used for j in jobs) / 3
    assert end - begin <= busy + 10.0, (end - begin, busy)
    moved = [e for r in replicas[1:] for e in r.logs if e.get("event") == "job_claimed"]
    assert moved  # the other replicas took some


def newer_format(shared: Path, session_id: str, pointer: str, version: int) -> None:
    """Rewrite the session's checkpoint blob as a newer format version would (meta
    ``version``), in place."""
    path = shared / session_id / pointer
    with np.load(path, allow_pickle=False) as blob:
        state, corpus = blob["state"].tobytes(), blob["corpus"].tobytes()
    with np.load(io.BytesIO(state), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(arrays["meta"].tobytes().decode())
    meta["version"] = version
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    state_buffer = io.BytesIO()
    np.savez(state_buffer, **arrays)
    out = io.BytesIO()
    np.savez(
        out,
        state=np.frombuffer(state_buffer.getvalue(), dtype=np.uint8),
        corpus=np.frombuffer(corpus, dtype=np.uint8),
    )
    path.write_bytes(out.getvalue())


def newer_replica_env(tmp_path: Path) -> dict[str, str]:
    """A replica of a newer release, as far as checkpoints go: it also reads version 3."""
    site = tmp_path / "newer-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import rnnserve_server.storage.checkpoint as c\nc.READ_VERSIONS = (1, 2, 3)\n"
    )
    return {"PYTHONPATH": str(site)}


@pytest.mark.timeout(90)
def test_a_checkpoint_of_a_newer_format_is_left_to_a_replica_that_reads_it(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    (first,) = start_replicas(server_factory, redis_server, shared, count=1)
    with first.client(timeout=30) as client:
        session = client.create_session(TEXT, session_id="u", hidden_size=32, seed=1)
        name = session.start_training(800, report_every=20).name
        wait_until(lambda: published(redis_server, "u") > 50, 30, "the job to train")
    assert first.stop() == 0  # the job is checkpointed RUNNING, its lease released
    pointer = redis_get(redis_server, "rnnserve:s:{u}:ckpt")
    assert pointer is not None
    newer_format(shared, "u", pointer, version=3)  # as a newer replica would have written it

    (old,) = start_replicas(server_factory, redis_server, shared, count=1)
    wait_until(
        lambda: any(e.get("event") == "session_too_new" for e in old.logs),
        30,
        "the old replica to meet the checkpoint",
    )
    with old.client(timeout=30) as client:
        with pytest.raises(RnnServeError) as info:
            client.session("u").info()
        assert info.value.reason == "NEWER_FORMAT"
        assert "newer than this server reads" in str(info.value)
        (listed,) = client.list_sessions()  # listed, not BROKEN, saying why
        assert listed.state == pb.SESSION_STATE_OWNER_UNREACHABLE
        assert "newer than this server reads" in listed.error
    assert redis_jobs(redis_server) == ["u"]  # the job is kept
    assert redis_get(redis_server, "rnnserve:s:{u}:lease") is None  # and left alone
    assert redis_get(redis_server, "rnnserve:s:{u}:ckpt") == pointer
    assert not [e for e in old.logs if e.get("event") == "checkpoint_broken"]

    newer = server_factory(
        env=newer_replica_env(tmp_path),
        redis_url=redis_server.url,
        shared_dir=shared,
        lease_ttl=2,
    )
    with old.client(timeout=30) as client:  # through the old replica: forwarded to the newer
        ended = wait_ended(client, name)
    assert ended.state == pb.JOB_STATE_SUCCEEDED
    assert ended.step == 800
    assert owner_of([old, newer], redis_server, "u") is newer


def test_the_client_hints_the_load_balancer_with_the_session_of_a_job_name() -> None:
    """Job calls name their session only inside the job's name: the client still sends it as
    x-session-id, so nginx's hash reaches the owner first."""
    from rnnserve._base import session_of

    assert session_of(pb.GetJobRequest(name="sessions/a-1/jobs/0f3a")) == "a-1"
    assert session_of(pb.ListJobsRequest(session_id="b")) == "b"
    assert session_of(pb.StopJobRequest(name="not/a/job/name")) == ""
    assert session_of(pb.WatchJobRequest(name="sessions/c/jobs")) == ""
