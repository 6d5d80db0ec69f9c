"""Training jobs (docs/training-jobs.md) against real server processes: they outlive their
client, survive SIGTERM and SIGKILL of the server and end exactly at their target, Start is
idempotent by request_id, a stale name never stops a newer job, jobs take turns."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import uuid
from typing import TYPE_CHECKING

import pytest
from rnnserve import Client, JobNotFound, LimitExceeded, Session, SessionBusy
from rnnserve.v1 import rnn_service_pb2 as pb

if TYPE_CHECKING:
    from tests.conftest import ServerFactory, ServerHandle

TEXT = "the quick brown fox jumps over the lazy dog. " * 80
# Slow enough that a job of a few thousand updates spans many chunks and checkpoints.
MODEL = dict(hidden_size=64, seq_length=25, batch_size=4, seed=3)


def new_session(client: Client, **overrides: object) -> Session:
    options: dict[str, object] = dict(MODEL)
    options.update(overrides)
    return client.create_session(
        TEXT,
        session_id="j-" + uuid.uuid4().hex[:8],
        **options,  # type: ignore[arg-type]
    )


@pytest.mark.timeout(120)
def test_a_job_outlives_the_client_that_started_it(server: ServerHandle) -> None:
    with server.client() as client:
        session = new_session(client)
    # A separate process starts the job, prints its name and blocks; it is then SIGKILLed.
    code = (
        "import sys\n"
        "from rnnserve import Client\n"
        f"with Client({server.address!r}) as c:\n"
        f"    job = c.session({session.id!r}).start_training(600, report_every=50)\n"
        "    print(job.name, flush=True)\n"
        "    sys.stdin.read()\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        name = child.stdout.readline().strip()
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    with server.client() as client:
        job = client.session(session.id).job(name)
        ended = job.wait()
        assert ended.state == pb.JOB_STATE_SUCCEEDED
        assert ended.stop_reason == pb.STOP_REASON_COMPLETED
        assert ended.step == ended.target_step == 600
        assert client.session(session.id).info().step == 600


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_job_resumes_after_a_restart_and_ends_exactly_at_its_target(
    server_factory: ServerFactory, sig: signal.Signals
) -> None:
    server = server_factory(checkpoint_interval=0.2)
    with server.client() as client:
        session = new_session(client)
        job = session.start_training(4000, report_every=50)
        assert job.info.target_step == 4000
        with job.follow() as stream:  # until a checkpoint holds some of its progress
            for progress in stream:
                if progress.checkpointed_step > 0:
                    break
        assert 0 < progress.checkpointed_step < 4000
    if sig == signal.SIGTERM:
        assert server.stop() == 0
    else:
        server.kill()
    again = server_factory(data_dir=server.data_dir, checkpoint_interval=0.2)
    resumed = again.wait_for_log("train_started", job=job.name, resumed=True)
    assert 0 < resumed["start_step"] < 4000
    with again.client() as client:
        ended = client.session(session.id).job(job.name).wait()
        assert ended.state == pb.JOB_STATE_SUCCEEDED, ended
        assert ended.step == ended.target_step == 4000
        assert ended.seconds_used > 0
        assert client.session(session.id).info().step == 4000


@pytest.mark.timeout(60)
def test_a_retried_start_returns_the_same_job(server: ServerHandle) -> None:
    with server.client() as client:
        session = new_session(client)
        first = session.start_training(200, request_id="retry-1")
        again = session.start_training(200, request_id="retry-1")
        assert again.name == first.name
        first.wait()
        late = session.start_training(200, request_id="retry-1")  # after it ended
        assert late.name == first.name and late.info.state == pb.JOB_STATE_SUCCEEDED
        assert [j.name for j in session.jobs()] == [first.name]
        assert session.info().step == 200


@pytest.mark.timeout(60)
def test_stop_with_an_old_name_leaves_a_newer_job_running(server: ServerHandle) -> None:
    with server.client() as client:
        session = new_session(client)
        old = session.start_training(1_000_000)
        stopped = old.stop()
        assert stopped.state == pb.JOB_STATE_STOPPED
        assert stopped.stop_reason == pb.STOP_REASON_STOPPED
        newer = session.start_training(1_000_000)
        assert old.stop().state == pb.JOB_STATE_STOPPED  # unchanged, idempotent
        assert newer.refresh().state in (pb.JOB_STATE_RUNNING, pb.JOB_STATE_QUEUED)
        assert [j.name for j in session.jobs()] == [newer.name, old.name]
        with pytest.raises(JobNotFound):
            session.job("000000000000")
        assert newer.stop().state == pb.JOB_STATE_STOPPED


@pytest.mark.timeout(180)
def test_jobs_take_turns_with_one_slot(server_factory: ServerFactory) -> None:
    server = server_factory(max_running_jobs=1)
    with server.client() as client:
        sessions = [new_session(client) for _ in range(3)]
        jobs = [s.start_training(1500) for s in sessions]
        # The first holds the slot; the others wait for it, QUEUED.
        assert [j.info.state for j in jobs[1:]] == [pb.JOB_STATE_QUEUED] * 2
        first = jobs[0].wait()
        assert first.step == 1500
        # Round robin: while the first trained, the others had turns too.
        for job in jobs[1:]:
            assert job.refresh().steps_done > 0
        for job in jobs[1:]:
            assert job.wait().step == 1500


@pytest.mark.timeout(90)
def test_schedule_and_restore_best_through_the_server(server: ServerHandle) -> None:
    with server.client() as client:
        session = new_session(client, validation_fraction=0.2, learning_rate=0.05)
        job = session.start_training(
            400,
            eval_every=20,
            warmup_steps=50,
            decay="cosine",
            min_learning_rate=0.001,
            restore_best=True,
        )
        ended = job.wait()
        assert ended.state == pb.JOB_STATE_SUCCEEDED
        assert ended.spec.schedule.decay == pb.LEARNING_RATE_DECAY_COSINE
        assert ended.spec.restore_best
        assert ended.HasField("best_validation_loss") and 0 < ended.best_step <= 400
        info = session.info()
        assert info.step == 400
        # The session's peak learning rate is its own again after the schedule.
        assert info.config.learning_rate == pytest.approx(0.05)


@pytest.mark.timeout(60)
def test_bad_specs_are_refused_before_anything_runs(server: ServerHandle) -> None:
    with server.client() as client:
        session = new_session(client)
        from rnnserve import InvalidArgument

        with pytest.raises(InvalidArgument, match="restore_best needs a validation split"):
            session.start_training(10, restore_best=True)
        with pytest.raises(InvalidArgument, match="max_seconds"):
            session.start_training(10, max_seconds=-1)
        with pytest.raises(InvalidArgument, match="request_id"):
            session.start_training(10, request_id="no spaces please")
        assert session.jobs() == []
        job = session.start_training(1_000_000)
        with pytest.raises(SessionBusy, match=job.name):
            session.start_training(10)
        job.stop()


@pytest.mark.timeout(60)
def test_time_budget_and_server_time_limit_end_jobs(server_factory: ServerFactory) -> None:
    server = server_factory(max_job_seconds=1.0)
    with server.client() as client:
        session = new_session(client)
        budget = session.start_training(1_000_000, max_seconds=0.5).wait()
        assert budget.state == pb.JOB_STATE_SUCCEEDED
        assert budget.stop_reason == pb.STOP_REASON_TIME_BUDGET
        assert 0.5 <= budget.seconds_used < 1.0 and budget.step < 1_000_000
        limited = session.start_training(1_000_000).wait()
        assert limited.state == pb.JOB_STATE_STOPPED
        assert limited.stop_reason == pb.STOP_REASON_TIME_LIMIT
        assert limited.seconds_used >= 1.0


@pytest.mark.timeout(60)
def test_started_by_labels_the_token_and_caps_its_jobs(server_factory: ServerFactory) -> None:
    token = "a-secret-token"
    server = server_factory(auth_token=[token], max_jobs_per_token=1)
    label = "token:" + hashlib.sha256(token.encode()).hexdigest()[:8]
    with server.client(token=token) as client:
        first, second = new_session(client), new_session(client)
        job = first.start_training(1_000_000)
        assert job.info.started_by == label
        with pytest.raises(LimitExceeded, match="max_jobs_per_token"):
            second.start_training(10)
        job.stop()
        assert second.start_training(10).wait().started_by == label
    started = server.wait_for_log("train_started", job=job.name)
    ended = server.wait_for_log("train_finished", job=job.name)
    assert started["token"] == ended["token"] == label and started["session_id"] == first.id
    assert token not in server.text_log()


@pytest.mark.timeout(60)
def test_list_jobs_pages_newest_first(server: ServerHandle) -> None:
    with server.client() as client:
        session = new_session(client)
        names = [session.start_training(5).wait().name for _ in range(3)]
        stub = client._stub
        first = stub.ListJobs(pb.ListJobsRequest(session_id=session.id, page_size=2), timeout=10)
        assert [j.name for j in first.jobs] == names[::-1][:2] and first.next_page_token
        second = stub.ListJobs(
            pb.ListJobsRequest(
                session_id=session.id, page_size=2, page_token=first.next_page_token
            ),
            timeout=10,
        )
        assert [j.name for j in second.jobs] == names[:1] and not second.next_page_token
        assert [j.name for j in session.jobs()] == names[::-1]
