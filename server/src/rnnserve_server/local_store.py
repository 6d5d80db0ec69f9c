"""Checkpoints on disk: per session, ``<data_dir>/sessions/<id>.npz`` (the state) and
``<id>.corpus.npy`` (the training text), each written atomically.

Format (version 2). The state file is an uncompressed numpy ``.npz`` (a zip; ``allow_pickle``
is never used) with

- ``meta``: uint8 bytes of a UTF-8 JSON object ``{"format": "rnnserve.checkpoint",
  "version": 2, "session_id", "create_time", "update_time" (unix seconds), "step", "loss",
  "smoothed_loss", "corpus": {"length", "crc32"}, "trainer": <Trainer.state_dict() meta>}``;
- ``loss_history``: float64, the loss of every update, ``loss_history[i]`` is step ``i + 1``;
- ``trainer.<name>``: each array of ``Trainer.state_dict()`` but the corpus (weights,
  optimizer state, hidden states, cursors, RNG state).

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
import io
import json
import os
import stat
import tempfile
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import numpy as np

from rnnserve_server.checkpoint import (
    _ID_RE,
    FORMAT,
    READ_VERSIONS,
    VERSION,
    Checkpoint,
    CorpusRef,
    MetaCheck,
    _little_endian,
    corpus_crc32,
    validate_session_id,
)
from rnnserve_server.errors import CheckpointError

SUFFIX = ".npz"
CORPUS_SUFFIX = ".corpus.npy"
_TMP_PREFIX = ".tmp-"


def _read_regular(path: Path) -> bytes:
    """A regular file's bytes; CheckpointError for a FIFO, device or directory (reading a FIFO
    would block start-up forever). O_NONBLOCK makes opening a FIFO return at once."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CheckpointError(
                f"{path}: not a regular file", public="its checkpoint is not a regular file"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _npy_shape(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an .npy stream declares (reads only its header)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return tuple(int(n) for n in shape), np.dtype(dtype)


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
                and _ID_RE.fullmatch(stem)
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
            lock = open(self.data_dir / ".lock", "ab")  # noqa: SIM115 - held until close()
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                raise CheckpointError(
                    f"data directory {self.data_dir} is in use by another rnnserve-server"
                ) from None
            self._lock_file = lock
        return True

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
            if entry.endswith(CORPUS_SUFFIX) and _ID_RE.fullmatch(entry[: -len(CORPUS_SUFFIX)]):
                continue
            stem = entry[: -len(SUFFIX)] if entry.endswith(SUFFIX) else ""
            if stem and _ID_RE.fullmatch(stem):
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
            ids = _little_endian(np.asarray(corpus))
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
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8),
            "loss_history": np.asarray(ckpt.loss_history, dtype=np.float64),
        }
        for name, value in ckpt.trainer_arrays.items():
            if name != "corpus":
                arrays["trainer." + name] = np.asarray(value)
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
        """Read a checkpoint (state, then corpus); CheckpointError naming the file and the
        reason if it can't be.

        ``check`` sees the trainer meta and the array shapes the file declares before any
        array is read, so a file claiming a huge model is refused without allocating it.
        Weights or optimizer state that are not finite numbers are refused too.
        """
        path = self.path(session_id)
        try:
            data = _read_regular(path)
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                files = set(npz.files)
                if "meta" not in files:
                    raise CheckpointError(f"{path}: not an rnnserve checkpoint (no 'meta' entry)")
                meta = json.loads(npz["meta"].tobytes().decode("utf-8"))
                if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                    raise CheckpointError(f"{path}: not an rnnserve checkpoint (bad format tag)")
                if meta.get("version") not in READ_VERSIONS:
                    raise CheckpointError(
                        f"{path}: checkpoint format version {meta.get('version')!r} is not "
                        f"supported (this server reads versions "
                        f"{', '.join(map(str, READ_VERSIONS))})",
                        public=f"its checkpoint format version {meta.get('version')!r} is not "
                        "supported by this server",
                    )
                if meta.get("session_id") != session_id:
                    raise CheckpointError(
                        f"{path}: holds session {meta.get('session_id')!r}, not {session_id!r}"
                    )
                shapes = {}
                for name in npz.files:
                    with npz.zip.open(name + ".npy") as member:
                        shapes[name] = _npy_shape(member)[0]
                if check is not None:
                    trainer_meta = meta.get("trainer")
                    declared = {
                        n[len("trainer.") :]: v
                        for n, v in shapes.items()
                        if n.startswith("trainer.")
                    }
                    if isinstance(trainer_meta, dict):
                        try:
                            check(trainer_meta, declared)
                        except CheckpointError as exc:
                            raise CheckpointError(
                                f"{path}: {exc}", exc.public, damaged=exc.damaged
                            ) from None
                if shapes.get("loss_history") != (meta.get("step"),):
                    raise CheckpointError(
                        f"{path}: step {meta.get('step')!r} does not match the loss history's "
                        f"shape {shapes.get('loss_history')}",
                        public="its checkpoint is damaged (step and loss history disagree)",
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
            raise CheckpointError(
                f"{path}: file is missing", public="its checkpoint file is missing"
            ) from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise CheckpointError(
                f"{path}: unreadable ({type(exc).__name__}: {exc})",
                public="its checkpoint is damaged (unreadable)",
            ) from None
        for name, value in trainer_arrays.items():
            if value.dtype.kind in "fc" and not np.isfinite(value).all():
                raise CheckpointError(
                    f"{path}: array {name!r} holds values that are not finite (NaN or inf)",
                    public="its checkpoint holds weights that are not finite numbers",
                )
        step = meta.get("step")
        if not isinstance(step, int) or step != len(history):
            raise CheckpointError(
                f"{path}: step {step!r} does not match {len(history)} loss history entries"
            )
        trainer_meta = meta.pop("trainer", None)
        if not isinstance(trainer_meta, dict):
            raise CheckpointError(f"{path}: trainer metadata is missing")
        ref = None
        if meta["version"] >= 2:
            ref = self._corpus_ref(path, meta.pop("corpus", None))
            trainer_arrays["corpus"] = self._load_corpus(session_id, path, ref)
        elif "corpus" not in trainer_arrays:
            raise CheckpointError(f"{path}: the corpus is missing")
        return Checkpoint(session_id, meta, trainer_arrays, trainer_meta, history, ref)

    @staticmethod
    def _corpus_ref(path: Path, value: object) -> CorpusRef:
        if isinstance(value, dict):
            length, crc = value.get("length"), value.get("crc32")
            if isinstance(length, int) and isinstance(crc, int) and length >= 0 and crc >= 0:
                return CorpusRef(length, crc)
        raise CheckpointError(f"{path}: the corpus reference (length, crc32) is missing or bad")

    def _load_corpus(self, session_id: str, state: Path, ref: CorpusRef) -> np.ndarray:
        """The first ``ref.length`` ids of the corpus file, checked against ``ref``."""
        path = self.corpus_path(session_id)
        try:
            data = _read_regular(path)
            shape, _ = _npy_shape(io.BytesIO(data))
            if len(shape) != 1 or shape[0] > len(data):
                raise ValueError(f"declares shape {shape} in a file of {len(data)} bytes")
            ids = np.load(io.BytesIO(data), allow_pickle=False)
        except CheckpointError as exc:
            raise CheckpointError(
                str(exc), public="its corpus file is not a regular file"
            ) from None
        except FileNotFoundError:
            raise CheckpointError(
                f"{path}: corpus file is missing (the checkpoint {state.name} needs its first "
                f"{ref.length} characters)",
                public="its corpus file is missing",
            ) from None
        except (OSError, ValueError, EOFError) as exc:
            raise CheckpointError(
                f"{path}: unreadable ({type(exc).__name__}: {exc})",
                public="its corpus file is damaged (unreadable)",
            ) from None
        if not isinstance(ids, np.ndarray) or ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise CheckpointError(
                f"{path}: not a 1-D array of character ids",
                public="its corpus file is damaged (not character ids)",
            )
        if ids.shape[0] < ref.length:
            raise CheckpointError(
                f"{path}: holds {ids.shape[0]} characters, but the checkpoint {state.name} "
                f"needs {ref.length}; the corpus file and the checkpoint do not belong together",
                public="its corpus file is shorter than its checkpoint needs",
            )
        # Longer than recorded: an AppendText written before a crash, never acknowledged.
        ids = ids[: ref.length]
        if corpus_crc32(ids) != ref.crc32:
            raise CheckpointError(
                f"{path}: the checksum of its first {ref.length} characters does not match the "
                f"checkpoint {state.name}; the corpus file and the checkpoint do not belong "
                "together",
                public="its corpus file does not match its checkpoint (checksum)",
            )
        return ids

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
