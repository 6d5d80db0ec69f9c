"""Checkpoints on disk: one ``<data_dir>/sessions/<id>.npz`` per session, written atomically.

Format (version 1): an uncompressed numpy ``.npz`` (a zip; ``allow_pickle`` is never used) with

- ``meta``: uint8 bytes of a UTF-8 JSON object ``{"format": "rnnserve.checkpoint",
  "version": 1, "session_id", "create_time", "update_time" (unix seconds), "step", "loss",
  "smoothed_loss", "trainer": <Trainer.state_dict() meta>}``;
- ``loss_history``: float64, the loss of every update, ``loss_history[i]`` is step ``i + 1``;
- ``trainer.<name>``: each array of ``Trainer.state_dict()`` (weights, optimizer state,
  hidden states, corpus, cursors, RNG state).

A write goes to a temporary file in the same directory, is fsynced, renamed over the old file
with ``os.replace`` and the directory is fsynced, so a crash leaves the old or the new file,
never a torn one. A file that can't be read raises ``CheckpointError`` and is left in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

import numpy as np

from rnnserve_server import metrics
from rnnserve_server.errors import CheckpointError, InvalidArgumentError

FORMAT = "rnnserve.checkpoint"
VERSION = 1
SUFFIX = ".npz"
_TMP_PREFIX = ".tmp-"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)


def validate_session_id(session_id: str) -> None:
    """InvalidArgumentError unless the id is 1-64 of [A-Za-z0-9._-] starting with a letter or digit.

    This is what keeps every checkpoint path inside the data directory.
    """
    if _ID_RE.fullmatch(session_id):
        return
    shown = session_id if len(session_id) <= 80 else session_id[:77] + "..."
    raise InvalidArgumentError(
        f"session_id {shown!r} is invalid: use 1 to 64 characters of A-Z a-z 0-9 . _ -, "
        "starting with a letter or digit"
    )


@dataclass
class Checkpoint:
    """One session's saved state, as read from or written to disk."""

    session_id: str
    meta: dict[str, Any]  # session fields: create_time, update_time, step, loss, smoothed_loss
    trainer_arrays: dict[str, np.ndarray]
    trainer_meta: dict[str, Any]
    loss_history: np.ndarray  # float64, [step]


class Store:
    """The data directory. Methods do blocking I/O: call them from a worker thread."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.sessions_dir = data_dir / "sessions"
        self._lock_file: IO[bytes] | None = None

    def open(self) -> list[str]:
        """Create the directories and take the data-dir lock; return stale temp files removed.

        Raises CheckpointError when another server holds the lock.
        """
        self.sessions_dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.data_dir / ".lock", "ab")  # noqa: SIM115 - held for the process lifetime
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise CheckpointError(
                f"data directory {self.data_dir} is in use by another rnnserve-server"
            ) from None
        self._lock_file = lock
        removed = []
        # Temp files are half-written checkpoints of a crashed process; never a committed one.
        for path in self.sessions_dir.glob(_TMP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path.name)
        return removed

    def close(self) -> None:
        """Release the data-dir lock."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def path(self, session_id: str) -> Path:
        """The checkpoint path of a (validated) session id."""
        validate_session_id(session_id)
        return self.sessions_dir / (session_id + SUFFIX)

    def scan(self) -> tuple[list[str], list[str]]:
        """(session ids with a checkpoint file, names of other files ignored), both sorted."""
        ids, ignored = [], []
        for entry in sorted(os.listdir(self.sessions_dir)):
            if entry.startswith(_TMP_PREFIX):
                continue
            stem = entry[: -len(SUFFIX)] if entry.endswith(SUFFIX) else ""
            if stem and _ID_RE.fullmatch(stem):
                ids.append(stem)
            else:
                ignored.append(entry)
        return ids, ignored

    def save(self, ckpt: Checkpoint) -> int:
        """Write a checkpoint atomically; return its size in bytes."""
        meta = dict(ckpt.meta)
        meta.update(
            format=FORMAT, version=VERSION, session_id=ckpt.session_id, trainer=ckpt.trainer_meta
        )
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
            "loss_history": np.asarray(ckpt.loss_history, dtype=np.float64),
        }
        for name, value in ckpt.trainer_arrays.items():
            arrays["trainer." + name] = np.asarray(value)
        final = self.path(ckpt.session_id)
        started = time.perf_counter()
        fd, tmp_name = tempfile.mkstemp(
            prefix=_TMP_PREFIX + ckpt.session_id + ".", dir=self.sessions_dir
        )
        try:
            with os.fdopen(fd, "wb") as f:
                cast(Any, np.savez)(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            os.replace(tmp_name, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            metrics.record_checkpoint(time.perf_counter() - started, ok=False)
            raise
        self._fsync_dir()
        metrics.record_checkpoint(time.perf_counter() - started)
        return size

    def load(self, session_id: str) -> Checkpoint:
        """Read a checkpoint; CheckpointError naming the file and the reason if it can't be."""
        path = self.path(session_id)
        try:
            data = path.read_bytes()
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                files = set(npz.files)
                if "meta" not in files:
                    raise CheckpointError(f"{path}: not an rnnserve checkpoint (no 'meta' entry)")
                meta = json.loads(npz["meta"].tobytes().decode("utf-8"))
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise CheckpointError(f"{path}: not an rnnserve checkpoint (bad format tag)")
                if meta.get("version") != VERSION:
                    raise CheckpointError(
                        f"{path}: checkpoint format version {meta.get('version')!r} is not "
                        f"supported (this server reads version {VERSION})"
                    )
                if meta.get("session_id") != session_id:
                    raise CheckpointError(
                        f"{path}: holds session {meta.get('session_id')!r}, not {session_id!r}"
                    )
                history = np.array(npz["loss_history"], dtype=np.float64)
                trainer_arrays = {
                    name[len("trainer.") :]: np.array(npz[name])
                    for name in npz.files
                    if name.startswith("trainer.")
                }
        except CheckpointError:
            raise
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file is missing") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
        step = meta.get("step")
        if not isinstance(step, int) or step != len(history):
            raise CheckpointError(
                f"{path}: step {step!r} does not match {len(history)} loss history entries"
            )
        trainer_meta = meta.pop("trainer", None)
        if not isinstance(trainer_meta, dict):
            raise CheckpointError(f"{path}: trainer metadata is missing")
        return Checkpoint(session_id, meta, trainer_arrays, trainer_meta, history)

    def delete(self, session_id: str) -> bool:
        """Remove a session's checkpoint; False if there was none."""
        try:
            self.path(session_id).unlink()
        except FileNotFoundError:
            return False
        self._fsync_dir()
        return True

    def _fsync_dir(self) -> None:
        fd = os.open(self.sessions_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
