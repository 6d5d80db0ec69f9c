"""Training jobs' parts without a server: the learning-rate schedule, restore_best in the
session's chunks, the scheduler's turns, and job records in a checkpoint."""

from __future__ import annotations

import asyncio
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from rnnserve_server.engine.model_config import ModelConfig
from rnnserve_server.engine.schedule import LearningRateSchedule
from rnnserve_server.engine.trainer import Trainer
from rnnserve_server.engine.vocab import Vocab
from rnnserve_server.sessions.job_record import RUNNING, STOPPED, JobRecord
from rnnserve_server.sessions.session import MAX_JOB_HISTORY, Session
from rnnserve_server.sessions.session_types import TrainRun
from rnnserve_server.storage.local_store import LocalStore
from rnnserve_server.usecases.job_scheduler import JobScheduler

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


def _session(**config: object) -> Session:
    vocab = Vocab.from_text(TEXT)
    options: dict[str, object] = dict(
        hidden_size=16, seq_length=10, batch_size=2, seed=1, learning_rate=0.01, optimizer="adam"
    )
    options.update(config)
    return Session.new("s", Trainer(ModelConfig(**options), vocab, vocab.encode(TEXT)))  # type: ignore[arg-type]


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    cosine = LearningRateSchedule(warmup_steps=10, decay="cosine", min_learning_rate=0.01)
    assert cosine.rate(1.0, 0, 110) == pytest.approx(0.1)
    assert cosine.rate(1.0, 9, 110) == pytest.approx(1.0)
    assert cosine.rate(1.0, 10, 110) == pytest.approx(1.0)
    assert cosine.rate(1.0, 109, 110) == pytest.approx(0.01)
    middle = cosine.rate(1.0, 10 + 99 // 2, 110)
    assert 0.01 < middle < 1.0
    linear = LearningRateSchedule(decay="linear")  # the floor: a tenth of the peak
    assert linear.rate(2.0, 0, 101) == pytest.approx(2.0)
    assert linear.rate(2.0, 50, 101) == pytest.approx(1.1)
    assert linear.rate(2.0, 100, 101) == pytest.approx(0.2)
    assert LearningRateSchedule(warmup_steps=4).rate(1.0, 100, 200) == 1.0
    rates = [cosine.rate(1.0, i, 110) for i in range(10, 110)]
    assert all(a >= b for a, b in itertools.pairwise(rates))  # never rises


def test_the_trainer_updates_with_the_scheduled_rate() -> None:
    session = _session(optimizer="sgd", learning_rate=0.1)
    trainer = session.require_trainer()
    before = trainer.weights()
    run = TrainRun(steps=3, learning_rate=lambda step: 0.0)  # a zero rate: nothing moves
    session.train_chunk(3, 10.0, run)
    assert session.step == 3
    assert np.array_equal(trainer.weights(), before)
    session.after_job(None)  # the session's own rate again
    session.train_chunk(1, 10.0, TrainRun(steps=1))
    assert not np.array_equal(trainer.weights(), before)


def test_restore_best_keeps_and_puts_back_the_best_weights() -> None:
    session = _session(validation_fraction=0.3, learning_rate=0.05, optimizer="adam")
    record = JobRecord(job_id="a" * 12, spec={}, state=RUNNING)
    run = TrainRun(steps=60, eval_every=5, job=record, restore_best=True)
    session.train_chunk(60, 60.0, run)
    validations = [session.losses.validation[s] for s in range(5, 61, 5)]
    assert record.best_validation_loss == pytest.approx(min(validations))
    assert session.losses.validation[record.best_step] == pytest.approx(min(validations))
    assert record.best_weights is not None
    best = record.best_weights.copy()
    session.after_job(record.best_weights)
    assert np.array_equal(session.require_trainer().weights(), best)


async def test_the_scheduler_hands_slots_out_in_turn() -> None:
    scheduler = JobScheduler(1)
    order: list[str] = []

    async def job(name: str, chunks: int) -> None:
        for _ in range(chunks):
            await scheduler.acquire()
            order.append(name)
            await asyncio.sleep(0)  # the chunk "runs"
            scheduler.release()

    await asyncio.gather(job("a", 3), job("b", 3), job("c", 3))
    assert order == ["a", "b", "c"] * 3
    assert scheduler.running == 0


async def test_a_waiter_cancelled_as_the_slot_is_released_does_not_break_it() -> None:
    scheduler = JobScheduler(1)
    await scheduler.acquire()  # held
    waiter = asyncio.ensure_future(scheduler.acquire())
    await asyncio.sleep(0)  # it waits in line
    waiter.cancel()  # its place is cancelled at once; its handler runs later...
    scheduler.release()  # ...after a release has dropped that place: the slot is free
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert scheduler.running == 0 and scheduler.waiting == 0
    assert scheduler.try_acquire()


def test_jobs_and_best_weights_round_trip_a_checkpoint(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.open()
    try:
        session = _session(optimizer="adam")
        store.save(session.snapshot())  # type: ignore[arg-type]
        assert store.load("s").jobs == []  # a checkpoint with no jobs (as older ones)
        record = JobRecord(
            job_id="b" * 12,
            spec={"steps": 10},
            state=RUNNING,
            target_step=10,
            seconds_used=1.5,
            best_validation_loss=2.0,
            stale=1,
            request_id="r1",
        )
        record.best_weights = session.require_trainer().weights()
        session.jobs.append(record)
        store.save(session.snapshot())  # type: ignore[arg-type]
        loaded = Session.from_checkpoint(store.load("s"))
        (again,) = loaded.jobs
        assert again.to_dict() == record.to_dict()
        assert again.best_weights is not None
        assert np.array_equal(again.best_weights, record.best_weights)
        assert loaded.active_job is again
    finally:
        store.close()


def test_a_damaged_job_record_is_refused() -> None:
    with pytest.raises(ValueError, match="state"):
        JobRecord.from_dict({"job_id": "x", "spec": {}, "state": "dancing"})
    with pytest.raises(ValueError, match="seconds_used"):
        JobRecord.from_dict({"job_id": "x", "spec": {}, "seconds_used": math.inf})


def test_a_session_keeps_its_last_hundred_ended_jobs() -> None:
    session = _session()
    for i in range(MAX_JOB_HISTORY + 5):
        record = JobRecord(job_id=f"{i:012x}", spec={})
        session.begin("Train", record)
        record.end(STOPPED, "stopped", session.step, 0.0, 0.0)
        session.end()
    kept = [int(j.job_id, 16) for j in session.jobs]
    assert kept == list(range(5, MAX_JOB_HISTORY + 5))
