"""Checkpoints on disk: per session, ``<data_dir>/sessions/<id>.npz`` (the state) and
``<id>.corpus.npy`` (the training text), each written atomically.

Format (version 2). The state file is an uncompressed numpy ``.npz`` (a zip; ``allow_pickle``
is never used) with

- ``meta``: uint8 bytes of a UTF-8 JSON object ``{"format": "rnnserve.checkpoint",
  "version": 2, "session_id", "create_time", "update_time" (unix seconds), "step", "loss",
  "smoothed_loss", "corpus": {"length", "crc32"}, "trainer": <Trainer.state_dict() meta>,
  "jobs": [<the session's training jobs, oldest first: sessions/job_record.py>] (optional)}``;
- ``loss_history``: float64, the loss of every update, ``loss_history[i]`` is step ``i + 1``;
- ``trainer.<name>``: each array of ``Trainer.state_dict()`` but the corpus (weights,
  optimizer state, hidden states, cursors, RNG state);
- ``job.best_weights`` (optional): the running job's weights at its best validation loss
  (restore_best). Checkpoints without ``jobs`` or ``job.*`` (older ones) read as no jobs.

The corpus file is a ``.npy`` 1-D array of character ids (little-endian uint8, uint16 or int32:
the trainer's in-memory dtype). The state file belongs to its first ``corpus.length`` ids, whose
zlib CRC-32 (of the ids as little-endian int32) is ``corpus.crc32``. The corpus only grows
(AppendText), so it is rewritten only when it changed, always before the state file that refers
to it: a crash between the two leaves a corpus longer than the state's, and loading takes the
recorded prefix (the append was never acknowledged). A corpus file shorter than recorded, or
whose prefix has another checksum, makes the checkpoint unreadable. Version 1 (the corpus inside
the state file as ``trainer.corpus``, no ``corpus`` meta) is still read; the next write makes it
version 2.

A write goes to a temporary file (``.tmp-*``) in the same directory, is fsynced, renamed over
the old file with ``os.replace`` and the directory is fsynced, so a crash leaves the old or the
new file, never a torn one. A checkpoint that can't be read raises ``CheckpointError`` and its
files are left in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import numpy as np

from rnnserve_server.errors import CheckpointError
from rnnserve_server.storage.checkpoint import (
    FORMAT,
    ID_RE,
    VERSION,
    Checkpoint,
    CorpusRef,
    MetaCheck,
    corpus_crc32,
    little_endian,
    validate_session_id,
)
from rnnserve_server.storage.checkpoint_reader import corpus_ref, read_corpus, read_state

SUFFIX = ".npz"
CORPUS_SUFFIX = ".corpus.npy"
_TMP_PREFIX = ".tmp-"


class LocalStore:
    """The data directory. Methods do blocking I/O: call them from a worker thread."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.sessions_dir = data_dir / "sessions"
        self.location = str(data_dir)
        self._lock_file: IO[bytes] | None = None
        self._dirs_lock = threading.Lock()  # two I/O threads may find the directory gone

    def open(self) -> list[str]:
        """Create the directories and take the data-dir lock; return stale temp files removed.

        Raises CheckpointError when another server holds the lock.
        """
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        removed = []
        # Temp files are half-written files of a crashed process; never a committed one.
        for path in self.sessions_dir.glob(_TMP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path.name)
        return removed

    def remove_orphans(self) -> list[str]:
        """Remove corpus files no state file refers to (a kill during CreateSession or
        DeleteSession leaves one); return their names. Call at start, before any write."""
        removed = []
        for entry in sorted(os.listdir(self.sessions_dir)):
            stem = entry[: -len(CORPUS_SUFFIX)]
            if (
                entry.endswith(CORPUS_SUFFIX)
                and ID_RE.fullmatch(stem)
                and not os.path.lexists(self.sessions_dir / (stem + SUFFIX))
            ):
                with contextlib.suppress(FileNotFoundError):
                    (self.sessions_dir / entry).unlink()
                    removed.append(entry)
        return removed

    def ensure_dirs(self) -> bool:
        """Recreate the data directory (and its lock) if it was deleted while running; True
        if it had to. CheckpointError if another server took the recreated directory."""
        if self.sessions_dir.is_dir():
            return False
        with self._dirs_lock:
            if self.sessions_dir.is_dir():
                return False
            self.sessions_dir.mkdir(parents=True, exist_ok=True)
            # Our lock went with the old directory: take the new one's, or stop writing.
            self.close()
            self._take_lock()
        return True

    def _take_lock(self) -> None:
        """Hold the data directory's lock until close(); CheckpointError if another server
        holds it."""
        lock = open(self.data_dir / ".lock", "ab")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise CheckpointError(
                f"data directory {self.data_dir} is in use by another rnnserve-server"
            ) from None
        self._lock_file = lock

    def close(self) -> None:
        """Release the data-dir lock."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def path(self, session_id: str) -> Path:
        """The state checkpoint path of a (validated) session id."""
        validate_session_id(session_id)
        return self.sessions_dir / (session_id + SUFFIX)

    def corpus_path(self, session_id: str) -> Path:
        """The corpus file path of a (validated) session id."""
        validate_session_id(session_id)
        return self.sessions_dir / (session_id + CORPUS_SUFFIX)

    def mtime(self, session_id: str) -> float:
        """When the session's state file was last written (unix seconds)."""
        return self.path(session_id).stat().st_mtime

    def has_corpus(self, session_id: str) -> bool:
        """Whether the session's corpus file exists."""
        return self.corpus_path(session_id).exists()

    def scan(self) -> tuple[list[str], list[str]]:
        """(session ids with a state file, names of other files ignored), both sorted.

        Temp files and corpus files (``<id>.corpus.npy``) are neither: a corpus file without
        a state file is what a crash during CreateSession leaves, and is overwritten if the
        id is created again.
        """
        ids, ignored = [], []
        for entry in sorted(os.listdir(self.sessions_dir)):
            if entry.startswith(_TMP_PREFIX):
                continue
            if entry.endswith(CORPUS_SUFFIX) and ID_RE.fullmatch(entry[: -len(CORPUS_SUFFIX)]):
                continue
            stem = entry[: -len(SUFFIX)] if entry.endswith(SUFFIX) else ""
            if stem and ID_RE.fullmatch(stem):
                ids.append(stem)
            else:
                ignored.append(entry)
        return ids, ignored

    def save(self, ckpt: Checkpoint) -> int:
        """Write a checkpoint atomically: the corpus file first if ``trainer_arrays`` has the
        corpus, then the state file. Sets ``ckpt.corpus``; returns the bytes written."""
        size = 0
        corpus = ckpt.trainer_arrays.get("corpus")
        if corpus is not None:
            ids = little_endian(np.asarray(corpus))
            # The CRC is computed here, off the session lock, only when the corpus changed.
            ref = CorpusRef(int(ids.shape[0]), corpus_crc32(ids))
            size += self._write_atomic(
                self.corpus_path(ckpt.session_id),
                lambda f: np.save(f, ids, allow_pickle=False),
            )
            ckpt.corpus = ref
        elif ckpt.corpus is None:
            raise ValueError("no corpus and no CorpusRef of a corpus file on disk")
        ref = ckpt.corpus
        meta = dict(ckpt.meta)
        meta.update(
            format=FORMAT,
            version=VERSION,
            session_id=ckpt.session_id,
            corpus={"length": ref.length, "crc32": ref.crc32},
            trainer=ckpt.trainer_meta,
        )
        if ckpt.jobs:
            meta["jobs"] = ckpt.jobs
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
            "loss_history": np.asarray(ckpt.loss_history, dtype=np.float64),
        }
        for name, value in ckpt.trainer_arrays.items():
            if name != "corpus":
                arrays["trainer." + name] = np.asarray(value)
        for name, value in ckpt.job_arrays.items():
            arrays["job." + name] = np.asarray(value)
        size += self._write_atomic(
            self.path(ckpt.session_id), lambda f: cast(Any, np.savez)(f, **arrays)
        )
        return size

    def _write_atomic(self, final: Path, write: Callable[[IO[bytes]], object]) -> int:
        """Write a file by temp file, fsync, rename and directory fsync; its size in bytes."""
        fd, tmp_name = tempfile.mkstemp(prefix=_TMP_PREFIX + final.name + ".", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            os.replace(tmp_name, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            raise
        self._fsync_dir()  # the rename is durable before anything that depends on it
        return size

    def load(self, session_id: str, check: MetaCheck | None = None) -> Checkpoint:
        """Read a checkpoint (state, then corpus; checkpoint_reader.py checks them);
        CheckpointError naming the file and the reason if it can't be."""
        path = self.path(session_id)
        meta, trainer_arrays, history, job_arrays = read_state(path, session_id, check)
        jobs = meta.pop("jobs", [])
        if not isinstance(jobs, list):
            raise CheckpointError(f"{path}: its jobs are not a list")
        trainer_meta = meta.pop("trainer", None)
        if not isinstance(trainer_meta, dict):
            raise CheckpointError(f"{path}: trainer metadata is missing")
        ref = None
        if meta["version"] >= 2:
            ref = corpus_ref(path, meta.pop("corpus", None))
            trainer_arrays["corpus"] = read_corpus(self.corpus_path(session_id), path, ref)
        elif "corpus" not in trainer_arrays:
            raise CheckpointError(f"{path}: the corpus is missing")
        return Checkpoint(
            session_id, meta, trainer_arrays, trainer_meta, history, ref, jobs, job_arrays
        )

    def delete(self, session_id: str) -> bool:
        """Remove a session's files (the state first); False if there was no state file.

        OSError if the state file can't be removed (the session stays as it was); once it is
        gone the session is deleted, and a corpus file that can't be removed is an orphan that
        the next start removes.
        """
        try:
            self.path(session_id).unlink()
        except FileNotFoundError:
            found = False
        else:
            found = True
        with contextlib.suppress(OSError):
            self.corpus_path(session_id).unlink()
        with contextlib.suppress(OSError):
            self._fsync_dir()
        return found

    def _fsync_dir(self) -> None:
        fd = os.open(self.sessions_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
