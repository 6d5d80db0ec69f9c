"""Faults: SIGKILL at random moments during Train, SIGTERM during Train, divergence.

The kill trials share one data directory: every trial restarts the server on what the last
one left, checks it, trains, and kills the server again at a random moment
(``bench/kill_trials.py``, which ``bench/soak_kill.py`` runs for 100+ trials).
"""

from __future__ import annotations

import itertools
import math
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
from rnnserve import Client, TrainingDiverged
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve_server.storage.local_store import LocalStore

from bench.kill_trials import CONFIG, KILL_SETTINGS, TEXT, TRAINED, run_kill_trials

if TYPE_CHECKING:
    from tests.conftest import ServerFactory


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_during_train_loses_nothing_acknowledged(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    results = run_kill_trials(
        lambda d: server_factory(data_dir=d, **KILL_SETTINGS), tmp_path / "data", 20, seed=4
    )
    assert len(results) == 20
    for r in results:
        for sid in TRAINED:
            assert r.restored[sid] >= r.acked[sid] > 0


# ----- SIGTERM ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigterm_checkpoints_every_session_and_exits_within_grace(
    server_factory: ServerFactory,
) -> None:
    """Two Trains, a watcher and a session changed by Step just before: all saved, exit 0."""
    grace = 5.0
    server = server_factory(grace=grace, checkpoint_interval=3600)
    with server.client() as client:
        trained = [client.create_session(TEXT, session_id=f"t{i}", **CONFIG) for i in range(2)]
        stepped = client.create_session(TEXT, session_id="stepped", **CONFIG)
        idle = client.create_session(TEXT, session_id="idle", **CONFIG)
        streams = [s.train(10**6, report_every=10) for s in trained]
        for stream in streams:
            next(stream)
        # retry_for=0: this checks that the server ends its watchers (the client library
        # would reconnect to a server that comes back).
        watch = trained[0].watch_loss(1, retry_for=0)
        assert next(watch).step == 1
        for _ in range(3):
            stepped.step()
        sent = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        finals = [stream.wait() for stream in streams]
        assert [f.stop_reason for f in finals] == [pb.STOP_REASON_SHUTDOWN] * 2
        last = 1
        for point in watch:  # the watch ends cleanly (no error) after the last point
            assert point.step == last + 1
            last = point.step
        assert server.wait(grace + 10) == 0
        assert time.monotonic() - sent < grace
    steps = {"t0": finals[0].step, "t1": finals[1].step, "stepped": 3, "idle": 0}
    assert last == steps["t0"]
    restarted = server_factory(data_dir=server.data_dir)
    with restarted.client() as client:
        for session_id, step in steps.items():
            info = client.session(session_id).info()
            assert (info.step, info.checkpointed_step) == (step, step), session_id
        assert idle.id in {s.session_id for s in client.list_sessions()}


# ----- divergence -------------------------------------------------------------------------------


def _state(client: Client, session_id: str) -> str:
    """Everything observable about a session's model, as text (so NaN == NaN)."""
    s = client.session(session_id)
    info = s.info()
    return repr(
        (
            info.step,
            info.loss,
            info.smoothed_loss,
            s.predict(TEXT[:60]).loss,
            s.generate(40, seed=3),
            [p.loss for p in itertools.islice(s.watch_loss(1), info.step)],
        )
    )


def _assert_finite_checkpoint(data_dir: Path, session_id: str) -> int:
    ckpt = LocalStore(data_dir).load(session_id)
    assert np.isfinite(ckpt.loss_history).all()
    for name, array in ckpt.trainer_arrays.items():
        if array.dtype.kind == "f":
            assert np.isfinite(array).all(), name
    return int(ckpt.meta["step"])


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("dtype", "learning_rate"), [("float32", 1e37), ("float64", 1e306)])
def test_divergence_keeps_last_good_weights_and_no_checkpoint_holds_nan(
    server_factory: ServerFactory, dtype: str, learning_rate: float
) -> None:
    """Weights grow by ~lr per step until the next update would overflow: FAILED_PRECONDITION
    with reason TRAINING_DIVERGED (a Train ends with STOP_REASON_DIVERGED), unchanged."""
    server = server_factory(log_level="debug")
    with server.client() as client:
        s = client.create_session(
            TEXT,
            session_id="d",
            preset="notebook",
            learning_rate=learning_rate,
            seed=1,
            dtype=dtype,
        )
        good = 0
        with pytest.raises(TrainingDiverged) as step_error:
            for good in range(100):  # noqa: B007 - the count is used after the loop
                s.step()
        assert step_error.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert step_error.value.reason == "TRAINING_DIVERGED"
        assert step_error.value.metadata["session_id"] == "d"
        assert "learning rate is probably too high" in step_error.value.details
        assert s.info().step == good
        history = [p.loss for p in itertools.islice(s.watch_loss(1), good)]
        assert all(math.isfinite(x) for x in history)
        before = _state(client, "d")
        final = s.train(100).wait()
        assert (final.stop_reason, final.steps_done) == (pb.STOP_REASON_DIVERGED, 0)
        with pytest.raises(TrainingDiverged, match="learning rate is probably too high"):
            s.step(TEXT[:40])
        assert _state(client, "d") == before
        server.wait_for_log("checkpoint_written", session_id="d", step=good)
        info = s.info()
        assert info.state == pb.SESSION_STATE_READY and info.checkpointed_step == info.step
        assert _assert_finite_checkpoint(server.data_dir, "d") == good
    assert server.stop() == 0
    assert _assert_finite_checkpoint(server.data_dir, "d") == good
    restarted = server_factory(data_dir=server.data_dir)
    with restarted.client() as client:
        assert _state(client, "d") == before
