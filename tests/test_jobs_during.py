"""Every call while a job runs: one test per row of docs/training-jobs.md's table."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from rnnserve import Client, Job, JobNotFound, Session, SessionBusy, SessionNotFound
from rnnserve.v1 import rnn_service_pb2 as pb

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

TEXT = "the quick brown fox jumps over the lazy dog. " * 40
pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def client(module_server: ServerHandle) -> Iterator[Client]:
    with module_server.client() as c:
        yield c


def running_job(client: Client, **options: object) -> tuple[Session, Job]:
    """A new session and a job on it that won't end by itself, once it has trained."""
    session = client.create_session(
        TEXT, session_id="d-" + uuid.uuid4().hex[:8], hidden_size=32, seq_length=16, seed=5
    )
    job = session.start_training(1_000_000, report_every=20, **options)  # type: ignore[arg-type]
    with job.follow() as stream:
        next(iter(stream))  # it trains
    return session, job


def test_get_and_list_sessions_show_the_job(client: Client) -> None:
    session, job = running_job(client)
    try:
        info = session.info()
        assert info.state == pb.SESSION_STATE_TRAINING
        assert info.job.name == job.name
        assert info.job.state == pb.JOB_STATE_RUNNING
        assert info.job.steps_done > 0 and info.job.HasField("eta_seconds")
        listed = {s.session_id: s for s in client.list_sessions()}
        assert listed[session.id].job.name == job.name
    finally:
        job.stop()
    assert not session.info().HasField("job")


def test_append_text_is_applied_between_chunks(client: Client) -> None:
    session, job = running_job(client)
    try:
        before = session.info().corpus_chars
        response = session.append_text("a lazy dog naps. " * 10)
        assert response.session.corpus_chars == before + 170
        assert job.refresh().state == pb.JOB_STATE_RUNNING
        with job.follow() as stream:
            next(iter(stream))  # it goes on training, on the longer corpus
    finally:
        job.stop()


def test_update_session_is_applied_between_chunks_and_recorded(client: Client) -> None:
    session, job = running_job(client)
    try:
        updated = session.update(learning_rate=0.002, clip=3.0)
        assert updated.config.learning_rate == pytest.approx(0.002)
        assert job.refresh().state == pb.JOB_STATE_RUNNING
    finally:
        job.stop()
    assert session.info().config.clip == pytest.approx(3.0)


def test_generate_predict_export_fork_are_served(client: Client) -> None:
    session, job = running_job(client)
    try:
        assert len(session.generate(50, seed=1)) == 50
        assert session.predict("the quick").loss > 0
        archive = session.export()
        assert archive
        copy = session.fork("f-" + uuid.uuid4().hex[:8])
        assert copy.info().state == pb.SESSION_STATE_READY and copy.info().step > 0
        assert copy.jobs() == []  # a fork carries no job
    finally:
        job.stop()


def test_step_train_and_start_job_are_refused_naming_the_job(client: Client) -> None:
    session, job = running_job(client, request_id="own-id")
    try:
        with pytest.raises(SessionBusy, match=job.name):
            session.step()
        with pytest.raises(SessionBusy, match=job.name):
            session.train(10).wait()
        with pytest.raises(SessionBusy, match=job.name):
            session.start_training(10)
        assert session.start_training(10, request_id="own-id").name == job.name  # its retry
    finally:
        job.stop()


def test_stop_job_stops_it_and_checkpoints(client: Client) -> None:
    session, job = running_job(client)
    stopped = job.stop()
    assert stopped.state == pb.JOB_STATE_STOPPED
    assert stopped.stop_reason == pb.STOP_REASON_STOPPED
    info = session.info()
    assert info.state == pb.SESSION_STATE_READY
    assert info.checkpointed_step == info.step == stopped.step


def test_delete_session_stops_the_job_then_deletes(client: Client) -> None:
    session, job = running_job(client)
    stream = job.follow()
    session.delete()
    for _ in stream:
        pass
    assert stream.job.state == pb.JOB_STATE_STOPPED
    assert stream.job.stop_reason == pb.STOP_REASON_DELETED
    with pytest.raises(SessionNotFound):
        job.refresh()


def test_import_session_never_starts_a_job(client: Client) -> None:
    session, job = running_job(client)
    try:
        archive = session.export()
    finally:
        job.stop()
    imported = client.import_session(archive, session_id="i-" + uuid.uuid4().hex[:8])
    info = imported.info()
    assert info.state == pb.SESSION_STATE_READY and not info.HasField("job")
    assert imported.jobs() == []
    with pytest.raises(JobNotFound):
        imported.job()


def test_watch_loss_follows_every_update_live(client: Client) -> None:
    session, job = running_job(client)
    try:
        start = session.info().step
        with session.watch_loss(start + 1) as points:
            steps = [p.step for p in itertools.islice(points, 50)]
        assert steps == list(range(start + 1, start + 51))
    finally:
        job.stop()
