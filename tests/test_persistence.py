"""Checkpoints: restart, exact resume, broken files, eviction; and the store on its own."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from rnnserve import Session, SessionBroken
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve_server.engine.model_config import PRESETS
from rnnserve_server.engine.trainer import Trainer
from rnnserve_server.engine.vocab import Vocab
from rnnserve_server.errors import CheckpointError, InvalidArgumentError
from rnnserve_server.storage.checkpoint import Checkpoint, CorpusRef, validate_session_id
from rnnserve_server.storage.local_store import LocalStore

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
            # A sentence for the client; the path and the exception go to the server log.
            assert listed[name].error.startswith("its ")
            assert str(first.data_dir) not in listed[name].error
        assert "version 99" in listed["versioned"].error
        assert client.session("good").step().step == 2
        with pytest.raises(SessionBroken, match="could not be loaded"):
            client.session("garbage").step()
        broken = client.session("truncated").info()
        assert broken.state == pb.SESSION_STATE_BROKEN
    assert second.stop() == 0
    for entry in ("checkpoint_broken", str(truncated)):
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


# ----- write-behind checkpoints after Step, and the corpus file -----------------------------


def _wait_checkpointed(session: Session, step: int, timeout: float = 20.0) -> None:
    """Poll GetSession until checkpointed_step reaches ``step`` (AssertionError at timeout)."""
    deadline = time.monotonic() + timeout
    while (seen := session.info().checkpointed_step) < step:
        assert time.monotonic() < deadline, f"checkpointed_step {seen} < {step} after {timeout} s"


@pytest.mark.timeout(60)
def test_a_single_step_is_checkpointed_without_further_calls(
    server_factory: ServerFactory,
) -> None:
    """The write starts after the Step; nothing else (no interval: an hour) triggers it."""
    server = server_factory(checkpoint_interval=3600, log_level="debug")
    with server.client() as client:
        s = client.create_session(TEXT, session_id="one", **CONFIG)  # type: ignore[arg-type]
        mark = server.mark()
        assert s.step().step == 1
        written = server.wait_for_log("checkpoint_written", start=mark, session_id="one", step=1)
        assert written["corpus_chars"] == len(TEXT)
        assert s.info().checkpointed_step == 1
    server.kill()
    restarted = server_factory(data_dir=server.data_dir)
    with restarted.client() as client:
        assert client.session("one").info().step == 1


@pytest.mark.timeout(90)
def test_sigkill_after_a_burst_of_steps_keeps_the_acknowledged_step(
    server_factory: ServerFactory,
) -> None:
    """Three rounds of 150 Steps, each SIGKILLed right after its last Step's response (the
    second waits for the write-behind to catch up first), then a last restart to check."""
    data_dir = None
    history: list[float] = []
    acked = 0
    for round_ in range(4):
        server = server_factory(data_dir=data_dir, checkpoint_interval=3600, log_level="debug")
        data_dir = server.data_dir
        with server.client() as client:
            if round_ == 0:
                s = client.create_session(TEXT, session_id="burst", **CONFIG)  # type: ignore[arg-type]
            else:
                s = client.session("burst")
                info = s.info()
                assert info.step >= acked and info.checkpointed_step == info.step
                points = list(itertools.islice(s.watch_loss(1), info.step))
                assert [p.step for p in points] == list(range(1, info.step + 1))
                assert [p.loss for p in points][: len(history)] == history  # exact resume
                history = [p.loss for p in points]
            if round_ == 3:
                break
            for _ in range(150):
                last = s.step().step
            if round_ == 1:  # the write-behind catches up with the last Step on its own
                _wait_checkpointed(s, last)
            seen = s.info().checkpointed_step
            assert seen == last if round_ == 1 else seen > 0
        server.kill()
        logged = [e["step"] for e in server.logs if e.get("event") == "checkpoint_written"]
        acked = max([seen, *logged])


@pytest.mark.timeout(90)
def test_a_corpus_file_that_does_not_match_its_checkpoint_is_broken(
    server_factory: ServerFactory,
) -> None:
    first = server_factory()
    names = ("good", "cut", "short", "flipped", "gone", "longer")
    with first.client() as client:
        for name in names:
            client.create_session(TEXT, session_id=name, **CONFIG).step()  # type: ignore[arg-type]
    assert first.stop() == 0
    sessions = first.data_dir / "sessions"
    cut = sessions / "cut.corpus.npy"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size - 100])  # truncated by hand
    ids = np.load(sessions / "short.corpus.npy")
    np.save(sessions / "short.corpus.npy", ids[:-1])
    flipped = ids.copy()
    flipped[5] = (flipped[5] + 1) % 10
    np.save(sessions / "flipped.corpus.npy", flipped)
    (sessions / "gone.corpus.npy").unlink()
    np.save(sessions / "longer.corpus.npy", np.concatenate([ids, ids[:40]]))  # unacknowledged
    before = {p.name: p.read_bytes() for p in sessions.iterdir()}

    second = server_factory(data_dir=first.data_dir)
    with second.client() as client:
        listed = {s.session_id: s for s in client.list_sessions()}
        assert set(listed) == set(names)
        for name in ("good", "longer"):
            assert listed[name].state == pb.SESSION_STATE_READY, listed[name].error
            assert listed[name].corpus_chars == len(TEXT) and listed[name].step == 1
        for name, reason in (
            ("cut", "unreadable"),
            ("short", "shorter than its checkpoint needs"),
            ("flipped", "checksum"),
            ("gone", "corpus file is missing"),
        ):
            assert listed[name].state == pb.SESSION_STATE_BROKEN, name
            assert reason in listed[name].error and "/" not in listed[name].error
            assert f"{name}.corpus.npy" in second.text_log()  # the file is named in the log
            with pytest.raises(SessionBroken, match="could not be loaded"):
                client.session(name).step()
        assert client.session("longer").step().step == 2
    assert second.stop() == 0
    after = {p.name: p.read_bytes() for p in sessions.iterdir()}
    for name in ("cut", "short", "flipped", "gone"):  # never deleted, never rewritten
        for suffix in (".npz", ".corpus.npy"):
            assert after.get(name + suffix) == before.get(name + suffix)


@pytest.mark.timeout(120)
def test_append_text_then_sigkill_keeps_a_consistent_corpus(
    server_factory: ServerFactory,
) -> None:
    """SIGKILL at a random moment after AppendText and a Step on the new text: the restart has
    the old corpus or the new one, and a step made after the append implies the new one."""
    rng = random.Random(7)
    extra = TEXT * 150  # ~360k characters: the corpus file takes a while to write
    data_dir = None
    before = after = len(TEXT)  # corpus length before / after the last trial's append
    appended_at = 0  # the step count when it was appended
    acked = (len(TEXT), 1)  # (corpus, step) seen durable in checkpoint_written lines
    for trial in range(7):
        server = server_factory(data_dir=data_dir, log_level="debug")
        data_dir = server.data_dir
        with server.client() as client:
            if trial == 0:
                s = client.create_session(TEXT, session_id="grow", **CONFIG)  # type: ignore[arg-type]
                s.step()
                _wait_checkpointed(s, 1)
            else:
                s = client.session("grow")
            info = s.info()
            assert info.state == pb.SESSION_STATE_READY, info.error
            assert info.corpus_chars in (before, after), (trial, info.corpus_chars)
            if info.step > appended_at or acked[0] == after:  # a step made after the append,
                assert info.corpus_chars == after  # or the append itself, was durable
            assert info.checkpointed_step == info.step >= acked[1]
            points = list(itertools.islice(s.watch_loss(1), info.step))
            assert [p.step for p in points] == list(range(1, info.step + 1))
            s.predict(TEXT[:50])
            if trial == 6:
                break
            before, after, appended_at = (
                info.corpus_chars,
                info.corpus_chars + len(extra),
                info.step,
            )
            acked = (before, info.step)
            mark = server.mark()
            assert s.append_text(extra).session.corpus_chars == after
            s.step()
            time.sleep(rng.uniform(0.0, 0.03))  # the random kill moment: the point of the test
        server.kill()
        for e in server.logs[mark:]:
            if e.get("event") == "checkpoint_written":
                acked = (max(acked[0], int(e["corpus_chars"])), max(acked[1], int(e["step"])))


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
    store = LocalStore(tmp_path)
    store.open()
    try:
        ckpt = _checkpoint()
        store.save(ckpt)
        store.save(ckpt)  # overwrite in place
        # no temp files left; the corpus in its own file
        assert sorted(os.listdir(store.sessions_dir)) == ["unit.corpus.npy", "unit.npz"]
        assert zipfile.is_zipfile(store.path("unit"))
        loaded = store.load("unit")
        assert (
            loaded.meta["step"] == 3 and loaded.loss_history.tolist() == ckpt.loss_history.tolist()
        )
        assert set(loaded.trainer_arrays) == set(ckpt.trainer_arrays)
        for name, value in ckpt.trainer_arrays.items():
            np.testing.assert_array_equal(loaded.trainer_arrays[name], value)
        assert loaded.corpus == ckpt.corpus == CorpusRef(len(TEXT), loaded.corpus.crc32)  # type: ignore[union-attr]
        assert store.scan() == (["unit"], [])
        assert store.delete("unit") and not store.delete("unit")
        assert os.listdir(store.sessions_dir) == []  # both files gone
        with pytest.raises(CheckpointError, match="missing"):
            store.load("unit")
    finally:
        store.close()


def test_store_writes_the_corpus_only_when_given(tmp_path: Path) -> None:
    """A checkpoint without the corpus refers to the file on disk, which is not rewritten."""
    store = LocalStore(tmp_path)
    store.open()
    try:
        ckpt = _checkpoint()
        store.save(ckpt)
        corpus_file = store.corpus_path("unit")
        before = corpus_file.stat()
        ref = ckpt.corpus
        without = dict(ckpt.trainer_arrays)
        corpus = without.pop("corpus")
        later = Checkpoint(
            "unit", {**ckpt.meta}, without, ckpt.trainer_meta, ckpt.loss_history, ref
        )
        state_size = store.save(later)
        assert state_size == store.path("unit").stat().st_size  # only the state was written
        after = corpus_file.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        np.testing.assert_array_equal(store.load("unit").trainer_arrays["corpus"], corpus)
        with pytest.raises(ValueError, match="CorpusRef"):
            store.save(Checkpoint("unit", {}, without, ckpt.trainer_meta, ckpt.loss_history))
    finally:
        store.close()


def _corpus_variants(corpus: np.ndarray) -> dict[str, tuple[bytes | np.ndarray, str]]:
    """Corpus file contents that do not match the state file, and the error expected."""
    flipped = corpus.copy()
    flipped[len(flipped) // 2] = (flipped[len(flipped) // 2] + 1) % 3
    return {
        "shorter": (corpus[:-5], "holds .* characters, but the checkpoint"),
        "flipped": (flipped, "checksum"),
        "cut": (b"", "unreadable"),  # filled in below: the file's bytes cut in half
        "junk": (b"\x93NUMPY garbage", "unreadable"),
        "floats": (corpus.astype(np.float32), "not a 1-D array of character ids"),
    }


def test_store_detects_a_corpus_that_does_not_match_the_state(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.open()
    try:
        ckpt = _checkpoint()
        corpus = np.asarray(ckpt.trainer_arrays["corpus"])
        for name, (content, reason) in _corpus_variants(corpus).items():
            store.save(
                Checkpoint(
                    name, ckpt.meta, ckpt.trainer_arrays, ckpt.trainer_meta, ckpt.loss_history
                )
            )
            path = store.corpus_path(name)
            if name == "cut":
                content = path.read_bytes()[: path.stat().st_size // 2]
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                np.save(path, content)
            written = path.read_bytes()
            with pytest.raises(CheckpointError, match=reason):
                store.load(name)
            assert path.read_bytes() == written and store.path(name).exists()  # never deleted
        store.corpus_path("flipped").unlink()
        with pytest.raises(CheckpointError, match="corpus file is missing"):
            store.load("flipped")
    finally:
        store.close()


def test_store_takes_the_recorded_prefix_of_a_longer_corpus(tmp_path: Path) -> None:
    """An AppendText whose corpus file was written but not its state: the old corpus."""
    store = LocalStore(tmp_path)
    store.open()
    try:
        ckpt = _checkpoint()
        store.save(ckpt)
        corpus = np.asarray(ckpt.trainer_arrays["corpus"])
        np.save(store.corpus_path("unit"), np.concatenate([corpus, corpus[:50]]).astype(np.uint8))
        loaded = store.load("unit")
        np.testing.assert_array_equal(loaded.trainer_arrays["corpus"], corpus)
        assert loaded.corpus == ckpt.corpus
        Trainer.from_state(loaded.trainer_arrays, loaded.trainer_meta)  # loads as it was
    finally:
        store.close()


def test_store_reads_version_1_and_rewrites_it_as_version_2(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.open()
    try:
        ckpt = _checkpoint()
        meta = {
            **ckpt.meta,
            "format": "rnnserve.checkpoint",
            "version": 1,
            "session_id": "old",
            "trainer": ckpt.trainer_meta,
        }
        arrays: dict[str, Any] = {
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            "loss_history": ckpt.loss_history,
            **{"trainer." + k: v for k, v in ckpt.trainer_arrays.items()},
        }
        with open(store.path("old"), "wb") as f:
            np.savez(f, **arrays)
        loaded = store.load("old")
        assert loaded.corpus is None  # no corpus file yet
        np.testing.assert_array_equal(
            loaded.trainer_arrays["corpus"], ckpt.trainer_arrays["corpus"]
        )
        store.save(loaded)
        assert store.corpus_path("old").exists()
        again = store.load("old")
        assert again.corpus is not None and again.corpus.length == len(TEXT)
        with np.load(store.path("old")) as npz:
            assert "trainer.corpus" not in npz.files
            assert json.loads(npz["meta"].tobytes())["version"] == 2
    finally:
        store.close()


def test_store_scan_skips_corpus_and_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.open()
    try:
        for name in ("a", "x.corpus"):  # an id may itself end in .corpus
            store.save(_checkpoint(name))
        (store.sessions_dir / "orphan.corpus.npy").write_bytes(b"left by a crashed create")
        (store.sessions_dir / ".tmp-a.npz.abc").write_bytes(b"half written")
        (store.sessions_dir / "notes.txt").write_text("not ours")
        assert store.scan() == (["a", "x.corpus"], ["notes.txt"])
        assert store.load("x.corpus").meta["step"] == 3
    finally:
        store.close()


def test_store_reports_unreadable_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
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
    first, second = LocalStore(tmp_path), LocalStore(tmp_path)
    first.open()
    try:
        with pytest.raises(CheckpointError, match="in use"):
            second.open()
    finally:
        first.close()
    second.open()
    second.close()
