"""Kill trials: SIGKILL a real server at random moments during Train, restart it on the same
data directory, and check that nothing acknowledged was lost.

What a client has been told is checkpointed ("acknowledged") comes from two places:
``Session.checkpointed_step`` read with GetSession just before the kill, and the server's debug
log line ``event=checkpoint_written`` (written after the file was renamed into place and the
directory fsynced, so even a line read after the kill is a durable acknowledgement).

Shared by ``tests/test_faults.py`` (20 trials in the suite) and ``bench/soak_kill.py`` (100+).
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rnnserve import Client, RnnServeError
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve_server.storage.local_store import LocalStore
from rnnserve_server.testing import ServerHandle

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 20
# Small and fast: thousands of steps a second, a checkpoint every training chunk.
CONFIG: dict[str, Any] = dict(hidden_size=16, seq_length=8, batch_size=2, optimizer="adam")
KILL_SETTINGS: dict[str, Any] = dict(log_level="debug", checkpoint_interval=0.01, grace=2)
TRAINED = ("a", "b")  # trained in every trial
MAX_KILL_DELAY = 0.3  # seconds after training is seen running


@dataclass
class TrialResult:
    """What one kill trial saw: per session, steps on disk after the restart vs acknowledged."""

    trial: int
    delay: float
    acked: dict[str, int] = field(default_factory=dict)  # before the kill
    restored: dict[str, int] = field(default_factory=dict)  # after the restart
    temp_files: int = 0  # half-written checkpoints left by the kill
    created: str = ""  # session whose CreateSession raced the kill
    create_acked: bool = False
    seconds: float = 0.0


@dataclass
class KillState:
    """What earlier trials established, checked by the next one."""

    history: dict[str, list[float]] = field(default_factory=dict)  # verified loss history
    acked: dict[str, int] = field(default_factory=dict)
    maybe: set[str] = field(default_factory=set)  # created, not acknowledged: may be missing


def check_files(data_dir: Path, state: KillState) -> int:
    """Every checkpoint file loads, is finite and not behind its ack; returns temp-file count."""
    store = LocalStore(data_dir)  # reading only; no lock taken
    ids, ignored = store.scan()
    names = os.listdir(store.sessions_dir)
    temps = [n for n in names if n.startswith(".tmp-")]
    assert ignored == [], f"unexpected files in the data dir: {ignored}"
    assert not any(t in ids for t in temps)  # a temp file is never taken for a checkpoint
    assert set(state.history) <= set(ids), f"lost sessions: {set(state.history) - set(ids)}"
    assert set(ids) <= set(state.history) | state.maybe, f"unknown sessions: {ids}"
    for session_id in ids:
        ckpt = store.load(session_id)  # CheckpointError if torn
        step = int(ckpt.meta["step"])
        assert step >= state.acked.get(session_id, 0), (session_id, step, state.acked)
        assert np.isfinite(ckpt.loss_history).all()
        for name, array in ckpt.trainer_arrays.items():
            if array.dtype.kind == "f":
                assert np.isfinite(array).all(), f"{session_id}: {name} not finite"
    return len(temps)


def verify(client: Client, state: KillState) -> dict[str, int]:
    """Every session loads, is not behind its ack, and has a gap-free, prefix-stable history."""
    listed = {s.session_id: s for s in client.list_sessions()}
    assert set(state.history) <= set(listed) <= set(state.history) | state.maybe
    restored = {}
    for session_id, info in listed.items():
        assert info.state == pb.SESSION_STATE_READY, f"{session_id}: {info.error}"
        assert info.step >= state.acked.get(session_id, 0)
        assert info.checkpointed_step == info.step
        points = list(itertools.islice(client.session(session_id).watch_loss(1), info.step))
        assert [p.step for p in points] == list(range(1, info.step + 1)), "history has gaps"
        losses = [p.loss for p in points]
        previous = state.history.get(session_id, [])
        # Steps redone after a kill are bit-for-bit the ones lost (exact resume).
        assert losses[: len(previous)] == previous, f"{session_id}: history changed"
        state.history[session_id] = losses
        restored[session_id] = info.step
    state.maybe.clear()
    return restored


def run_kill_trials(
    start: Callable[[Path], ServerHandle],
    data_dir: Path,
    trials: int,
    seed: int,
    on_trial: Callable[[TrialResult], None] | None = None,
) -> list[TrialResult]:
    """Start, verify, train, SIGKILL at a random moment; ``trials`` times, then verify once more.

    ``start(data_dir)`` must start a server with ``KILL_SETTINGS``. Raises AssertionError on
    the first violated guarantee.
    """
    rng = random.Random(seed)
    state = KillState()
    results: list[TrialResult] = []
    for trial in range(trials + 1):
        began = time.monotonic()
        server = start(data_dir)
        try:
            with server.client() as client:
                restored = verify(client, state)
                if results:
                    results[-1].restored = restored
                if trial == trials:
                    break
                result = TrialResult(trial, delay=rng.uniform(0.0, MAX_KILL_DELAY))
                for session_id in TRAINED:
                    if session_id not in state.history:
                        client.create_session(TEXT, session_id=session_id, seed=1, **CONFIG)
                        state.history[session_id] = []
                streams = [
                    client.session(sid).train(10**6, report_every=rng.choice((1, 7, 50)))
                    for sid in TRAINED
                ]
                for stream in streams:
                    next(stream)  # training is running (sync on a progress message)
                for sid in TRAINED:  # a trial means something only once a step is on disk
                    _wait_until(lambda: client.session(sid).info().checkpointed_step > 0)  # noqa: B023
                created = threading.Event()
                if trial % 3 == 0:  # a CreateSession racing the kill
                    result.created = f"n{trial}"
                    state.maybe.add(result.created)
                    racer = threading.Thread(
                        target=_create, args=(client, result.created, created), daemon=True
                    )
                    racer.start()
                time.sleep(result.delay)  # the random kill moment: the point of the test
                for sid in TRAINED:
                    result.acked[sid] = client.session(sid).info().checkpointed_step
                server.kill()
                if result.created:
                    racer.join(10)
                    result.create_acked = created.is_set()
                for stream in streams:
                    stream.close()
        finally:
            server.kill()
        for entry in server.logs:
            if entry.get("event") == "checkpoint_written":
                sid = str(entry["session_id"])
                result.acked[sid] = max(result.acked.get(sid, 0), int(entry["step"]))
        for sid, step in result.acked.items():
            state.acked[sid] = max(state.acked.get(sid, 0), step)
        if result.create_acked:
            state.history[result.created] = []
        result.temp_files = check_files(data_dir, state)
        result.seconds = time.monotonic() - began
        results.append(result)
        if on_trial is not None:
            on_trial(result)
    return results


def _wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; a loaded machine can take a while to checkpoint."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _create(client: Client, session_id: str, done: threading.Event) -> None:
    try:
        client.create_session(TEXT, session_id=session_id, seed=2, **CONFIG)
    except RnnServeError:
        return  # the server died first
    done.set()
