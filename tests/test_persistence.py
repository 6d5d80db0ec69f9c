"""Checkpoints: restart, exact resume, broken files, eviction; and the store on its own."""

from __future__ import annotations

import json
import os
import signal
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from rnnserve import SessionBusy
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve_server.errors import CheckpointError, InvalidArgumentError
from rnnserve_server.model import PRESETS, Trainer
from rnnserve_server.store import Checkpoint, Store, validate_session_id
from rnnserve_server.vocab import Vocab

if TYPE_CHECKING:
    from tests.conftest import ServerFactory

TEXT = "It was the best of times, it was the worst of times, it was the age of wisdom. " * 30
CONFIG = dict(hidden_size=24, seq_length=12, batch_size=2, seed=11, optimizer="adam")


@pytest.mark.timeout(90)
def test_restart_keeps_sessions_history_and_resumes_exactly(server_factory: ServerFactory) -> None:
    first = server_factory()
    with first.client() as client:
        s = client.create_session(TEXT, session_id="keep", **CONFIG)  # type: ignore[arg-type]
        losses = [s.step().loss for _ in range(15)]
        s.train(10).wait()
        before = s.info()
        history = [(p.step, p.loss) for p in _take(s.watch_loss(1), 25)]
    assert first.stop() == 0

    second = server_factory(data_dir=first.data_dir)
    with second.client() as client:
        s = client.session("keep")
        info = s.info()
        assert info.step == before.step == 25
        assert info.checkpointed_step == 25
        assert info.config == before.config and info.alphabet == before.alphabet
        assert info.smoothed_loss == before.smoothed_loss
        assert info.create_time == before.create_time
        replay = [(p.step, p.loss) for p in _take(s.watch_loss(0), 25)]
        assert replay == history
        assert [loss for _, loss in replay[:15]] == losses
        s.train(10).wait()
        resumed = s.predict(TEXT[:200]).loss
        resumed_sample = s.generate(100, seed=5)
    assert second.stop() == 0

    # Uninterrupted training from the same start gives the same weights, bit for bit.
    third = server_factory()
    with third.client() as client:
        s = client.create_session(TEXT, session_id="keep", **CONFIG)  # type: ignore[arg-type]
        for _ in range(15):
            s.step()
        s.train(20).wait()
        assert s.predict(TEXT[:200]).loss == resumed
        assert s.generate(100, seed=5) == resumed_sample


def _take(stream: object, n: int) -> list[pb.LossPoint]:
    points = []
    for point in stream:  # type: ignore[attr-defined]
        points.append(point)
        if len(points) == n:
            break
    return points


@pytest.mark.timeout(90)
def test_broken_checkpoints_are_reported_not_deleted(server_factory: ServerFactory) -> None:
    first = server_factory()
    with first.client() as client:
        for name in ("good", "truncated", "versioned"):
            client.create_session(TEXT, session_id=name, **CONFIG).step()  # type: ignore[arg-type]
    assert first.stop() == 0
    sessions = first.data_dir / "sessions"
    truncated = sessions / "truncated.npz"
    truncated.write_bytes(truncated.read_bytes()[:300])
    _rewrite_meta(sessions / "versioned.npz", version=99)
    (sessions / "garbage.npz").write_bytes(b"\x00not a zip at all" * 10)
    (sessions / "notes.txt").write_text("ignored, not a checkpoint name")
    sizes = {p.name: p.stat().st_size for p in sessions.iterdir()}

    second = server_factory(data_dir=first.data_dir)
    with second.client() as client:
        listed = {s.session_id: s for s in client.list_sessions()}
        assert set(listed) == {"good", "truncated", "versioned", "garbage"}
        assert listed["good"].state == pb.SESSION_STATE_READY
        for name in ("truncated", "versioned", "garbage"):
            assert listed[name].state == pb.SESSION_STATE_BROKEN
            assert name in listed[name].error
        assert "version 99" in listed["versioned"].error
        assert client.session("good").step().step == 2
        with pytest.raises(SessionBusy, match="could not be loaded"):
            client.session("garbage").step()
        broken = client.session("truncated").info()
        assert broken.state == pb.SESSION_STATE_BROKEN
    assert second.stop() == 0
    for entry in ("checkpoint_broken",):
        assert entry in second.text_log()
    after = {p.name: p.stat().st_size for p in sessions.iterdir()}
    assert {k: v for k, v in after.items() if k != "good.npz"} == {
        k: v for k, v in sizes.items() if k != "good.npz"
    }


def _rewrite_meta(path: Path, **changes: object) -> None:
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(arrays["meta"].tobytes())
    meta.update(changes)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.timeout(90)
def test_eviction_over_max_resident_reloads_transparently(server_factory: ServerFactory) -> None:
    server = server_factory(max_resident_sessions=1)
    with server.client() as client:
        a = client.create_session(TEXT, session_id="a", **CONFIG)  # type: ignore[arg-type]
        a.train(5).wait()
        expected = a.predict(TEXT[:100])
        mark = server.mark()
        b = client.create_session(TEXT, session_id="b", **CONFIG)  # type: ignore[arg-type]
        b.step()
        server.wait_for_log("session_evicted", start=mark, session_id="a")
        assert a.info().resident is False
        assert a.predict(TEXT[:100]) == expected  # reloaded from disk
        assert a.info().resident is True
        assert a.step().step == 6
        assert [p.step for p in _take(a.watch_loss(1), 6)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.timeout(60)
def test_idle_sessions_are_evicted(server_factory: ServerFactory) -> None:
    server = server_factory(idle_evict_seconds=0.2)
    with server.client() as client:
        s = client.create_session(TEXT, session_id="idle", **CONFIG)  # type: ignore[arg-type]
        s.step()
        server.wait_for_log("session_evicted", session_id="idle", reason="idle")
        assert s.info().resident is False
        assert s.step().step == 2


@pytest.mark.timeout(60)
def test_sigterm_during_train_checkpoints(server_factory: ServerFactory) -> None:
    first = server_factory()
    with first.client() as client:
        s = client.create_session(TEXT, session_id="t", **CONFIG)  # type: ignore[arg-type]
        stream = s.train(1_000_000, report_every=3)
        next(stream)
        first.process.send_signal(signal.SIGTERM)
        final = stream.wait()
        assert final.stop_reason == pb.STOP_REASON_SHUTDOWN
    assert first.wait() == 0
    second = server_factory(data_dir=first.data_dir)
    with second.client() as client:
        assert client.session("t").info().step == final.step


# ----- the store on its own ---------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "",
        ".hidden",
        "-x",
        "_x",
        "a/b",
        "..",
        "../x",
        "a\\b",
        "a\x00b",
        "a\nb",
        "caf\u00e9",
        "x" * 65,
        "x" * 10_000,
        " a",
        "a b",
    ],
)
def test_session_id_validation_rejects(bad: str) -> None:
    with pytest.raises(InvalidArgumentError, match="session_id"):
        validate_session_id(bad)


@pytest.mark.parametrize("good", ["a", "A.b_c-d", "0", "x" * 64, "s-1a2b3c"])
def test_session_id_validation_accepts(good: str) -> None:
    validate_session_id(good)


def _checkpoint(session_id: str = "unit") -> Checkpoint:
    vocab = Vocab.from_text(TEXT)
    trainer = Trainer(PRESETS["notebook"].replace(hidden_size=8, seed=1), vocab, vocab.encode(TEXT))
    results = [trainer.step() for _ in range(3)]
    arrays, meta = trainer.state_dict()
    history = np.array([r.loss for r in results])
    session_meta = {
        "create_time": 1.0,
        "update_time": 2.0,
        "step": 3,
        "loss": results[-1].loss,
        "smoothed_loss": 0.5,
    }
    return Checkpoint(session_id, session_meta, arrays, meta, history)


def test_store_round_trip_and_atomic_write(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.open()
    try:
        ckpt = _checkpoint()
        store.save(ckpt)
        store.save(ckpt)  # overwrite in place
        assert sorted(os.listdir(store.sessions_dir)) == ["unit.npz"]  # no temp files left
        assert zipfile.is_zipfile(store.path("unit"))
        loaded = store.load("unit")
        assert (
            loaded.meta["step"] == 3 and loaded.loss_history.tolist() == ckpt.loss_history.tolist()
        )
        assert set(loaded.trainer_arrays) == set(ckpt.trainer_arrays)
        for name, value in ckpt.trainer_arrays.items():
            np.testing.assert_array_equal(loaded.trainer_arrays[name], value)
        assert store.scan() == (["unit"], [])
        assert store.delete("unit") and not store.delete("unit")
        with pytest.raises(CheckpointError, match="missing"):
            store.load("unit")
    finally:
        store.close()


def test_store_reports_unreadable_files(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.open()
    try:
        store.save(_checkpoint("ok"))
        good = store.path("ok").read_bytes()
        store.path("cut").write_bytes(good[: len(good) // 2])
        store.path("junk").write_bytes(os.urandom(2000))
        store.path("other").write_bytes(good)  # a copy under another name
        for name, reason in (("cut", "unreadable"), ("junk", "unreadable"), ("other", "holds")):
            with pytest.raises(CheckpointError, match=reason):
                store.load(name)
        assert store.path("junk").exists()  # never deleted
    finally:
        store.close()


def test_store_lock_refuses_a_second_server(tmp_path: Path) -> None:
    first, second = Store(tmp_path), Store(tmp_path)
    first.open()
    try:
        with pytest.raises(CheckpointError, match="in use"):
            second.open()
    finally:
        first.close()
    second.open()
    second.close()
