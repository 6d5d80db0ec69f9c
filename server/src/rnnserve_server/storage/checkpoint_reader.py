"""Reading one session's checkpoint files (the format: local_store.py), checking everything
that can be checked before an array is allocated: the file is a regular file (a FIFO would
block start-up), the meta's format, version and session id, that its strings, times and losses
could go in a reply (checkpoint.meta_problem), the array shapes the file declares
(against the server's limits, through ``check``), then that the weights are finite and the
corpus matches its recorded length and checksum. A file that fails raises ``CheckpointError``
naming the file and the reason; its ``public`` text leaves the path out (it goes to clients).
"""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np

from rnnserve_server.errors import CheckpointError, CheckpointTooNewError
from rnnserve_server.storage.checkpoint import (
    FORMAT,
    READ_VERSIONS,
    CorpusRef,
    MetaCheck,
    corpus_crc32,
    meta_problem,
)


def read_regular(path: Path) -> bytes:
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


def npy_shape(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype an .npy stream declares (reads only its header)."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    return tuple(int(n) for n in shape), np.dtype(dtype)


def read_state(
    path: Path, session_id: str, check: MetaCheck | None = None
) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    """The state file's meta, trainer arrays, loss history and job arrays (``job.*``).

    ``check`` sees the trainer meta and the array shapes the file declares before any array
    is read, so a file claiming a huge model is refused without allocating it. Weights or
    optimizer state that are not finite numbers are refused too.
    """
    try:
        data = read_regular(path)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            files = set(npz.files)
            if "meta" not in files:
                raise CheckpointError(f"{path}: not an rnnserve checkpoint (no 'meta' entry)")
            text = npz["meta"].tobytes().decode("utf-8")
            meta = json.loads(text)
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not an rnnserve checkpoint (bad format tag)")
            version = meta.get("version")
            if type(version) is int and version > max(READ_VERSIONS):
                raise CheckpointTooNewError(
                    f"{path}: checkpoint format version {version} is newer than this "
                    f"server reads ({', '.join(map(str, READ_VERSIONS))})",
                    public=f"its checkpoint is format version {version}, newer than this "
                    f"server reads (up to {max(READ_VERSIONS)}): a newer rnnserve serves it",
                    version=version,
                )
            if version not in READ_VERSIONS:
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
            problem = meta_problem(meta, text)  # what no reply could carry
            if problem is not None:
                raise CheckpointError(
                    f"{path}: meta {problem}", public=f"its checkpoint is damaged: {problem}"
                )
            shapes = {}
            for name in npz.files:
                with npz.zip.open(name + ".npy") as member:
                    shapes[name] = npy_shape(member)[0]
            if check is not None:
                trainer_meta = meta.get("trainer")
                declared = {
                    n[len("trainer.") :]: v for n, v in shapes.items() if n.startswith("trainer.")
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
            job_arrays = {
                name[len("job.") :]: np.array(npz[name])
                for name in npz.files
                if name.startswith("job.")
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
    for name, value in (trainer_arrays | job_arrays).items():
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
    return meta, trainer_arrays, history, job_arrays


def corpus_ref(path: Path, value: object) -> CorpusRef:
    """The state file's reference to its corpus (length, crc32); CheckpointError if bad."""
    if isinstance(value, dict):
        length, crc = value.get("length"), value.get("crc32")
        if isinstance(length, int) and isinstance(crc, int) and length >= 0 and crc >= 0:
            return CorpusRef(length, crc)
    raise CheckpointError(f"{path}: the corpus reference (length, crc32) is missing or bad")


def read_corpus(path: Path, state: Path, ref: CorpusRef) -> np.ndarray:
    """The first ``ref.length`` ids of the corpus file ``path``, checked against ``ref`` (from
    the state file ``state``)."""
    try:
        data = read_regular(path)
        shape, _ = npy_shape(io.BytesIO(data))
        if len(shape) != 1 or shape[0] > len(data):
            raise ValueError(f"declares shape {shape} in a file of {len(data)} bytes")
        ids = np.load(io.BytesIO(data), allow_pickle=False)
    except CheckpointError as exc:
        raise CheckpointError(str(exc), public="its corpus file is not a regular file") from None
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
