"""What can be lost, row by row (docs/operations.md "What can be lost"): full disk, unwritable
or deleted data directory, damaged, oversized or non-regular checkpoint files, orphans, crashes
right after an acknowledged AppendText or Step.

A full disk is a real one: a small tmpfs mounted on the data directory (tests run as root, in
CI too); a read-only data directory is a read-only bind mount (chmod does not stop root).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import numpy as np
import pytest
from rnnserve import (
    Client,
    LimitExceeded,
    ServerUnavailable,
    SessionBroken,
    SessionNotFound,
)
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve_server.testing import free_port

if TYPE_CHECKING:
    from tests.conftest import ServerFactory

TEXT = "It was the best of times, it was the worst of times. " * 8
# The tanh RNN: tests below damage its arrays by name (trainer.Whh).
SMALL = dict(cell="rnn", num_layers=1, hidden_size=8, seq_length=8, batch_size=2, seed=3)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling interval, not synchronisation: the condition decides


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[None]:
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,bind,ro", str(path))
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def _fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` until ENOSPC; the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def _metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


@pytest.mark.timeout(120)
def test_full_disk_refuses_unsaved_writes_and_recovers(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Full disk: create refused (RESOURCE_EXHAUSTED) and not kept; a session that can't be
    checkpointed is UNSAVED, health NOT_SERVING, the metric counts it, Step/AppendText are
    refused; with room again everything recovers; SIGTERM that can't save exits 1 and the
    restart has the last checkpointed step."""
    metrics_port = free_port()
    with _tmpfs(tmp_path / "disk", "2m") as disk:
        server = server_factory(data_dir=disk, metrics_port=metrics_port, idle_evict_seconds=0)
        with server.client() as client:
            s = client.create_session(TEXT, session_id="kept", **SMALL)  # type: ignore[arg-type]
            s.step()
            _wait(lambda: s.info().checkpointed_step == 1, "the first step on disk")
            a = client.create_session(TEXT, session_id="appended", **SMALL)  # type: ignore[arg-type]
            filler = _fill(disk)

            with pytest.raises(LimitExceeded, match="disk is full") as refused:
                client.create_session(TEXT, session_id="new", **SMALL)  # type: ignore[arg-type]
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert refused.value.reason == "STORAGE_FULL" and refused.value.retry_delay
            with pytest.raises(SessionNotFound):
                client.session("new").info()
            assert not (disk / "sessions" / "new.corpus.npy").exists()

            # AppendText waits for its checkpoint: refused, and the text taken back.
            with pytest.raises(LimitExceeded, match="disk is full"):
                a.append_text("it was the worst. " * 20)
            assert a.info().corpus_chars == len(TEXT)
            assert a.info().state == pb.SESSION_STATE_UNSAVED

            s.step()  # acknowledged with checkpointed_step 1: its write fails behind the reply
            _wait(lambda: s.info().state == pb.SESSION_STATE_UNSAVED, "state UNSAVED")
            info = s.info()
            assert "disk is full" in info.error and info.checkpointed_step == 1
            assert client.health() == "NOT_SERVING"
            assert _metric(metrics_port, "rnnserve_sessions_unsaved") == 2
            with pytest.raises(LimitExceeded, match="disk is full"):
                s.step()
            with pytest.raises(LimitExceeded, match="disk is full"):
                s.append_text("it was the worst. " * 20)
            with pytest.raises(LimitExceeded, match="disk is full"):
                s.train(5).wait()
            assert s.info().corpus_chars == len(TEXT) and s.info().step == 2

            filler.unlink()  # room again: the next write retries and succeeds
            assert s.step().step == 3
            _wait(lambda: s.info().checkpointed_step == 3, "recovered checkpoints")
            assert s.info().state == pb.SESSION_STATE_READY
            added = a.append_text("it was the worst. " * 20)
            assert added.session.corpus_chars == len(TEXT) + 360
            assert added.session.state == pb.SESSION_STATE_READY
            _wait(lambda: client.health() == "SERVING", "health SERVING again")
            assert _metric(metrics_port, "rnnserve_sessions_unsaved") == 0
            created = client.create_session(TEXT, session_id="new", **SMALL)  # type: ignore[arg-type]
            assert created.info().checkpointed_step == 0

            _fill(disk)
            s.step()  # step 4: in memory only
            _wait(lambda: s.info().state == pb.SESSION_STATE_UNSAVED, "UNSAVED again")
        assert server.stop() == 1  # shutdown could not checkpoint "kept"
        assert "shutdown_unsaved" in server.text_log()
        (disk / "filler").unlink()

        again = server_factory(data_dir=disk)
        with again.client() as client:
            info = client.session("kept").info()
            assert info.state == pb.SESSION_STATE_READY and info.step == 3
            assert client.session("new").info().state == pb.SESSION_STATE_READY
            assert client.session("appended").info().corpus_chars == len(TEXT) + 360
        assert again.stop() == 0


@pytest.mark.timeout(120)
def test_a_train_ends_when_the_disk_fills_up(server_factory: ServerFactory, tmp_path: Path) -> None:
    """A long Train whose periodic checkpoint fails stops with RESOURCE_EXHAUSTED instead of
    training on what it can't keep; with room again it trains and saves."""
    with _tmpfs(tmp_path / "disk", "2m") as disk:
        server = server_factory(data_dir=disk, checkpoint_interval=0.05)
        with server.client() as client:
            s = client.create_session(TEXT, session_id="t", **SMALL)  # type: ignore[arg-type]
            filler = _fill(disk)
            with pytest.raises(LimitExceeded, match="disk is full"):
                s.train(1_000_000, report_every=100).wait()
            info = s.info()
            assert info.state == pb.SESSION_STATE_UNSAVED and info.checkpointed_step == 0
            filler.unlink()
            final = s.train(10).wait()
            assert final.checkpointed_step == final.step == info.step + 10
        assert server.stop() == 0


@pytest.mark.timeout(90)
def test_delete_on_a_read_only_data_dir_keeps_the_session(
    server_factory: ServerFactory,
) -> None:
    """DeleteSession that can't remove the file: UNAVAILABLE with a sentence, the session
    stays (in memory and after a restart); deleting works once the directory is writable.
    Meanwhile Step's checkpoint fails (UNSAVED, next Step refused) and CreateSession is
    refused."""
    server = server_factory()
    sessions = server.data_dir / "sessions"
    with server.client() as client:
        s = client.create_session(TEXT, session_id="stays", **SMALL)  # type: ignore[arg-type]
        with _read_only(sessions):
            with pytest.raises(ServerUnavailable, match="not writable") as refused:
                s.delete()
            assert "Error" not in refused.value.details and "/" not in refused.value.details
            assert refused.value.reason == "STORAGE_UNAVAILABLE" and refused.value.retry_delay
            assert refused.value.metadata["session_id"] == "stays"
            assert s.info().state == pb.SESSION_STATE_READY
            s.step()  # its checkpoint can't be written either
            _wait(lambda: s.info().state == pb.SESSION_STATE_UNSAVED, "state UNSAVED")
            assert "not writable" in s.info().error
            with pytest.raises(ServerUnavailable, match="not writable"):
                s.step()
            with pytest.raises(ServerUnavailable, match="not writable"):
                client.create_session(TEXT, session_id="never", **SMALL)  # type: ignore[arg-type]
        assert s.step().step == 2  # writable again: saved, then stepped
        _wait(lambda: s.info().checkpointed_step == 2, "step 2 on disk")
        assert (sessions / "stays.npz").exists()
    assert server.stop() == 0

    again = server_factory(data_dir=server.data_dir)
    with again.client() as client:
        s = client.session("stays")
        assert s.info().state == pb.SESSION_STATE_READY
        s.delete()
        with pytest.raises(SessionNotFound):
            s.info()
    assert again.stop() == 0
    assert not any(sessions.iterdir())


@pytest.mark.timeout(90)
def test_a_deleted_data_dir_is_recreated_and_rewritten(server_factory: ServerFactory) -> None:
    server = server_factory(idle_evict_seconds=0)
    with server.client() as client:
        s = client.create_session(TEXT, session_id="lives", **SMALL)  # type: ignore[arg-type]
        s.step()
        _wait(lambda: s.info().checkpointed_step == 1, "the first step on disk")
        mark = server.mark()
        subprocess.run(["rm", "-rf", str(server.data_dir)], check=True)
        s.step()
        server.wait_for_log("data_dir_recreated", start=mark)
        _wait(lambda: s.info().checkpointed_step == 2, "step 2 on disk")
        assert (server.data_dir / "sessions" / "lives.corpus.npy").exists()
        with pytest.raises(AssertionError, match="in use by another"):
            server_factory(data_dir=server.data_dir)  # the recreated directory is locked
    assert server.stop() == 0
    again = server_factory(data_dir=server.data_dir)
    with again.client() as client:
        info = client.session("lives").info()
        assert info.state == pb.SESSION_STATE_READY and info.step == 2
        assert info.corpus_chars == len(TEXT)
    assert again.stop() == 0


def _rewrite(path: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    change(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _set_config(arrays: dict[str, np.ndarray], **changes: object) -> None:
    meta = json.loads(arrays["meta"].tobytes())
    meta["trainer"]["config"].update(changes)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


def _check_broken(
    client: Client, sessions: Path, reasons: dict[str, str], intact: tuple[str, ...] = ()
) -> None:
    """Each named session is BROKEN with its reason, in a sentence without paths or
    exception text, and refuses use the same way: DATA_LOSS (reason CHECKPOINT_DAMAGED) for a
    damaged file, FAILED_PRECONDITION (SESSION_BROKEN) for an ``intact`` one over the limits."""
    listed = {s.session_id: s for s in client.list_sessions()}
    for name, reason in reasons.items():
        info = listed[name]
        assert info.state == pb.SESSION_STATE_BROKEN, name
        assert reason in info.error, (name, info.error)
        assert "/" not in info.error and "Error" not in info.error, info.error
        with pytest.raises(SessionBroken, match="could not be loaded") as refused:
            client.session(name).step()
        assert str(sessions) not in refused.value.details and reason in refused.value.details
        expected = (
            (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_BROKEN")
            if name in intact
            else (grpc.StatusCode.DATA_LOSS, "CHECKPOINT_DAMAGED")
        )
        assert (refused.value.code, refused.value.reason) == expected, name
        assert refused.value.metadata["session_id"] == name


@pytest.mark.timeout(120)
def test_oversized_misshapen_and_non_finite_checkpoints_are_broken(
    server_factory: ServerFactory,
) -> None:
    """A config over the server's limits (checked before anything is allocated), arrays of the
    wrong shape, NaN weights: BROKEN (listed, never loaded or deleted); the log has the path
    and the details."""
    first = server_factory()
    names = ("good", "huge", "shapes", "nan")
    with first.client() as client:
        for name in names:
            client.create_session(TEXT, session_id=name, **SMALL).step()  # type: ignore[arg-type]
    assert first.stop() == 0
    sessions = first.data_dir / "sessions"
    _rewrite(sessions / "huge.npz", lambda a: _set_config(a, hidden_size=2000))
    _rewrite(sessions / "shapes.npz", lambda a: a.update({"trainer.Whh": np.zeros((8, 9))}))
    _rewrite(sessions / "nan.npz", lambda a: a["trainer.Why"].__setitem__((0, 0), np.nan))
    before = {p.name: p.read_bytes() for p in sessions.iterdir()}

    second = server_factory(data_dir=first.data_dir, max_hidden_size=1024)
    with second.client() as client:
        assert {s.session_id for s in client.list_sessions()} == set(names)
        assert client.session("good").info().state == pb.SESSION_STATE_READY
        _check_broken(
            client,
            sessions,
            {
                "huge": "max-hidden-size",
                "shapes": "array shapes do not match",
                "nan": "not finite",
            },
            intact=("huge",),
        )
        assert client.session("good").step().step == 2
    assert second.stop() == 0
    log = second.text_log()
    assert str(sessions / "huge.npz") in log and "hidden_size (2000)" in log
    after = {p.name: p.read_bytes() for p in sessions.iterdir()}
    assert {k: v for k, v in after.items() if not k.startswith("good.")} == {
        k: v for k, v in before.items() if not k.startswith("good.")
    }


@pytest.mark.timeout(120)
def test_a_fifo_named_like_a_checkpoint_does_not_hang_start(
    server_factory: ServerFactory,
) -> None:
    """FIFOs named like a state or corpus file: start-up goes on, the sessions are BROKEN
    "not a regular file", any other FIFO is ignored (logged); nothing is removed."""
    first = server_factory()
    with first.client() as client:
        client.create_session(TEXT, session_id="fifo_corpus", **SMALL)  # type: ignore[arg-type]
    assert first.stop() == 0
    sessions = first.data_dir / "sessions"
    (sessions / "fifo_corpus.corpus.npy").unlink()
    os.mkfifo(sessions / "fifo_corpus.corpus.npy")
    os.mkfifo(sessions / "pipe.npz")
    os.mkfifo(sessions / "other.fifo")
    before = sorted(p.name for p in sessions.iterdir())

    second = server_factory(data_dir=first.data_dir)
    assert "other.fifo" in second.wait_for_log("ignored_files")["files"]
    with second.client() as client:
        reason = "not a regular file"
        _check_broken(client, sessions, {"fifo_corpus": reason, "pipe": reason})
    assert second.stop() == 0
    assert sorted(p.name for p in sessions.iterdir()) == before


@pytest.mark.timeout(90)
def test_orphan_corpus_files_are_removed_at_start(server_factory: ServerFactory) -> None:
    first = server_factory()
    with first.client() as client:
        client.create_session(TEXT, session_id="keep", **SMALL)  # type: ignore[arg-type]
    assert first.stop() == 0
    sessions = first.data_dir / "sessions"
    np.save(sessions / "gone.corpus.npy", np.arange(50, dtype=np.uint8))  # kill during Create
    second = server_factory(data_dir=first.data_dir)
    assert second.wait_for_log("removed_orphan_corpus", file="gone.corpus.npy")
    assert sorted(p.name for p in sessions.iterdir()) == ["keep.corpus.npy", "keep.npz"]
    with second.client() as client:
        assert client.session("keep").info().state == pb.SESSION_STATE_READY
    assert second.stop() == 0


@pytest.mark.timeout(120)
def test_acknowledged_append_text_survives_an_immediate_sigkill(
    server_factory: ServerFactory,
) -> None:
    """AppendText is on disk when acknowledged; a Step reply says what is on disk already
    (checkpointed_step), and a SIGKILL right after any reply keeps at least that."""
    for trial in range(3):
        server = server_factory(idle_evict_seconds=0)
        with server.client() as client:
            s = client.create_session(TEXT, session_id="a", **SMALL)  # type: ignore[arg-type]
            reply = s.step()
            assert 0 <= reply.checkpointed_step <= reply.step
            added = s.append_text("it was the best of times. " * (50 + trial))
            assert added.session.checkpointed_step == 1
            server.stop(signal.SIGKILL)
        again = server_factory(data_dir=server.data_dir)
        with again.client() as client:
            info = client.session("a").info()
            assert info.corpus_chars == added.session.corpus_chars
            assert info.step >= reply.checkpointed_step
        again.kill()


@pytest.mark.timeout(120)
def test_resident_memory_budget_evicts_and_refuses(server_factory: ServerFactory) -> None:
    """--max-resident-bytes: sessions beyond it go to disk (least recently used first); a
    session that alone exceeds it is refused with RESOURCE_EXHAUSTED naming the setting."""
    from rnnserve_server.config import load_settings
    from rnnserve_server.engine.model_config import PRESETS
    from rnnserve_server.sessions.residency import resident_bytes

    settings = load_settings([], environ={})
    machine = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < settings.max_resident_bytes <= machine // 2

    config = PRESETS["default"].replace(hidden_size=64, seq_length=8, batch_size=2)
    one = resident_bytes(config, len(set(TEXT)), len(TEXT))
    server = server_factory(max_resident_bytes=one * 3 // 2, idle_evict_seconds=0)
    shape = dict(hidden_size=64, seq_length=8, batch_size=2)
    with server.client() as client:
        a = client.create_session(TEXT, session_id="a", **shape)  # type: ignore[arg-type]
        a.step()
        b = client.create_session(TEXT, session_id="b", **shape)  # type: ignore[arg-type]
        assert not a.info().resident and b.info().resident
        assert a.step().step == 2  # reloaded; b makes room
        assert a.info().resident and not b.info().resident
        with pytest.raises(LimitExceeded, match="--max-resident-bytes") as refused:
            client.create_session(TEXT, session_id="big", hidden_size=1000)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert a.info().resident  # the refused create evicted nothing it did not need
    assert server.stop() == 0


def test_checkpoint_shapes_are_checked_before_allocating(tmp_path: Path) -> None:
    """A file whose config claims hidden 3000 (within the limit) but holds hidden-8 arrays is
    BROKEN without the ~150 MB its config implies ever being allocated."""
    import tracemalloc

    from rnnserve_server.config import Settings
    from rnnserve_server.engine.model_config import PRESETS
    from rnnserve_server.engine.trainer import Trainer
    from rnnserve_server.engine.vocab import Vocab
    from rnnserve_server.sessions.registry import Registry
    from rnnserve_server.sessions.session import Session
    from rnnserve_server.storage.local_store import LocalStore

    store = LocalStore(tmp_path)
    store.open()
    try:
        vocab = Vocab.from_text(TEXT)
        config = PRESETS["default"].replace(
            cell="rnn", num_layers=1, dropout=0.0, hidden_size=8, seq_length=8, batch_size=2
        )
        session = Session.new("claims", Trainer(config, vocab, vocab.encode(TEXT)))
        ckpt = session.snapshot()
        assert ckpt is not None
        ckpt.trainer_meta["config"]["hidden_size"] = 3000
        store.save(ckpt)
        registry = Registry(Settings(data_dir=tmp_path, max_hidden_size=4096), store)
        tracemalloc.start()
        try:
            loaded = registry.factory.load("claims")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 20_000_000, peak  # the hidden-3000 model was never allocated
        assert loaded.broken is not None and "array shapes" in loaded.broken.reason
    finally:
        store.close()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_a_stacked_model_wide_against_its_alphabet_loads_after_a_restart(
    tmp_path: Path, cell: str
) -> None:
    """The shape check's bound counts the layers above the first as H wide: a two-layer
    model of hidden 256 over a small alphabet was refused as damaged on every load."""
    from rnnserve_server.config import Settings
    from rnnserve_server.engine.model_config import PRESETS
    from rnnserve_server.engine.trainer import Trainer
    from rnnserve_server.engine.vocab import Vocab
    from rnnserve_server.sessions.registry import Registry
    from rnnserve_server.sessions.session import Session
    from rnnserve_server.storage.local_store import LocalStore

    store = LocalStore(tmp_path)
    store.open()
    try:
        vocab = Vocab.from_text(TEXT)
        config = PRESETS["default"].replace(
            cell=cell, num_layers=2, dropout=0.25, hidden_size=256, seq_length=8, batch_size=2
        )
        session = Session.new("wide", Trainer(config, vocab, vocab.encode(TEXT)))
        ckpt = session.snapshot()
        assert ckpt is not None
        store.save(ckpt)
        loaded = Registry(Settings(data_dir=tmp_path), store).factory.load("wide")
        assert loaded.broken is None
    finally:
        store.close()


def test_what_can_be_lost_names_tests_that_exist() -> None:
    """Every row of docs/operations.md "What can be lost" names at least one test, and each
    named test is defined in the file it names (``::name`` alone means the previous file)."""
    import re

    root = Path(__file__).resolve().parent.parent
    guide = (root / "docs" / "operations.md").read_text(encoding="utf-8")
    section = guide.split("## What can be lost", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) >= 5  # header + crash, SIGTERM, full disk, delete, damaged file, orphans
    for row in rows[1:]:
        named = re.findall(r"`(tests/[\w/]+\.py)?::(\w+)`", row)
        assert named, row
        current = ""
        for path, name in named:
            current = path or current
            source = (root / current).read_text(encoding="utf-8")
            assert re.search(rf"^def {name}\(", source, re.MULTILINE), (current, name)


@pytest.mark.timeout(90)
def test_a_file_damaged_while_evicted_is_broken_on_reload(server_factory: ServerFactory) -> None:
    """A session evicted to disk whose checkpoint is then damaged: its next use is
    FAILED_PRECONDITION with a sentence (no path, no exception text); the log has both."""
    server = server_factory(max_resident_sessions=1, idle_evict_seconds=0)
    sessions = server.data_dir / "sessions"
    with server.client() as client:
        s = client.create_session(TEXT, session_id="later", **SMALL)  # type: ignore[arg-type]
        s.step()
        # Clean before "other" arrives, so "later" (least recently used) is the one evicted.
        _wait(lambda: s.info().checkpointed_step == 1, "step 1 on disk")
        client.create_session(TEXT, session_id="other", **SMALL)  # type: ignore[arg-type]
        _wait(lambda: not s.info().resident, "eviction")
        _rewrite(sessions / "later.npz", lambda a: a["trainer.Whh"].__setitem__((0, 0), np.inf))
        with pytest.raises(SessionBroken, match="not finite") as refused:
            s.step()
        assert refused.value.code == grpc.StatusCode.DATA_LOSS
        assert str(sessions) not in refused.value.details
        assert "Error" not in refused.value.details
        info = s.info()
        assert info.state == pb.SESSION_STATE_BROKEN and "/" not in info.error
    assert server.stop() == 0
    assert str(sessions / "later.npz") in server.text_log()
    assert (sessions / "later.npz").exists()
