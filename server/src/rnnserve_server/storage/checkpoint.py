"""The checkpoint schema: what one session's saved state is, whatever store keeps it.

Format (version 2) as the local directory store writes it: see local_store.py.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from rnnserve_server.errors import InvalidArgumentError

FORMAT = "rnnserve.checkpoint"
VERSION = 2
READ_VERSIONS = (1, 2)
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
# Checks a checkpoint's trainer meta and the shapes its arrays declare (name -> shape, read from
# the .npy headers) before any array is read or any trainer allocated: raises CheckpointError.
MetaCheck = Callable[[dict[str, Any], dict[str, tuple[int, ...]]], None]


def validate_session_id(session_id: str) -> None:
    """InvalidArgumentError unless the id is 1-64 of [A-Za-z0-9._-] starting with a letter or digit.

    This is what keeps every checkpoint path inside the data directory.
    """
    if ID_RE.fullmatch(session_id):
        return
    shown = session_id if len(session_id) <= 80 else session_id[:77] + "..."
    raise InvalidArgumentError(
        f"session_id {shown!r} is invalid: use 1 to 64 characters of A-Z a-z 0-9 . _ -, "
        "starting with a letter or digit"
    )


@dataclass(frozen=True)
class CorpusRef:
    """Which corpus a state file belongs to: the first ``length`` ids of the corpus file,
    whose CRC-32 (of the ids as little-endian int32) is ``crc32``."""

    length: int
    crc32: int


def little_endian(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(ids, dtype=ids.dtype.newbyteorder("<"))


def corpus_crc32(ids: np.ndarray) -> int:
    """CRC-32 of the ids as little-endian int32, whatever dtype they are stored in."""
    return zlib.crc32(np.ascontiguousarray(ids, dtype="<i4").view(np.uint8).data)


@dataclass
class Checkpoint:
    """One session's saved state, as read from or written to disk.

    ``trainer_arrays`` holds the corpus as ``"corpus"`` when it must be written (and always
    after a load); without it, ``corpus`` names the corpus file already on disk that the state
    belongs to. ``Store.save`` and ``Store.load`` set ``corpus`` to what the files hold (None
    after loading a version-1 file: its corpus has no file yet).
    """

    session_id: str
    meta: dict[str, Any]  # session fields: create_time, update_time, step, loss, smoothed_loss
    trainer_arrays: dict[str, np.ndarray]
    trainer_meta: dict[str, Any]
    loss_history: np.ndarray  # float64, [step]
    corpus: CorpusRef | None = None
