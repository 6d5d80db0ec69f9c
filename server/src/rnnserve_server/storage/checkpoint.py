"""The checkpoint schema: what one session's saved state is, whatever store keeps it.

Format (version 2) as the local directory store writes it: see local_store.py.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
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


# 9999-12-31T23:59:59Z in unix seconds: the last time a google.protobuf.Timestamp can hold.
MAX_TIMESTAMP = 253_402_300_799
# A JSON escape of a surrogate (U+D800..U+DFFF): the only way strictly decoded UTF-8 JSON can
# hold a lone one. Pairs (one character outside the BMP) and escaped backslashes match too;
# the walk that follows decides.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _shown(key: object) -> str:
    """A JSON key as a message may show it: ASCII-escaped (it may be anything) and short."""
    text = str(key).encode("ascii", "backslashreplace").decode("ascii")
    return text if len(text) <= 40 else text[:37] + "..."


def _lone_surrogate(tree: Any) -> str | None:
    """The path of the first string in a JSON value (object keys too) that UTF-8 can't encode,
    or None. JSON can spell a lone surrogate ("\\ud800"), which is no character."""
    stack: list[tuple[str, Any]] = [("", tree)]
    while stack:  # not recursive: the JSON may nest as deep as its parser allowed
        path, value = stack.pop()
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"{path} (character {exc.start})"
        elif isinstance(value, dict):
            for key, item in value.items():
                sub = f"{path}.{_shown(key)}" if path else _shown(key)
                stack += [(sub, item), (sub + " (its key)", key)]
        elif isinstance(value, list):
            stack += [(f"{path}[{i}]", item) for i, item in enumerate(value)]
    return None


def meta_problem(meta: dict[str, Any], text: str) -> str | None:
    """What is wrong with the session fields a checkpoint or an archive shares, as a phrase
    naming the field, or None: every string (keys too) must be text UTF-8 can encode (a reply
    could not carry it), the times a Timestamp's seconds, the losses finite numbers. ``text``
    is the JSON ``meta`` was parsed from: a surrogate can only come from an escape in it, so
    ``meta`` is walked (~5 us a value) only when the text has one."""
    where = _lone_surrogate(meta) if _SURROGATE_ESCAPE.search(text) else None
    if where is not None:
        return f"{where} holds a lone surrogate, which is not a character (UTF-8 can't encode it)"
    for key in ("create_time", "update_time", "loss", "smoothed_loss"):
        value = meta.get(key, 0.0)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            return f"{key} is not a finite number"
        if key.endswith("_time") and not 0 <= value <= MAX_TIMESTAMP:
            return f"{key} is not a time from 1970 to 9999 in unix seconds"
    return None


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
    # The session's training jobs (sessions/job_record.py's dicts), oldest first, and the
    # running job's arrays (its best weights); a session store keeps them, an archive doesn't.
    jobs: list[dict[str, Any]] = field(default_factory=list)
    job_arrays: dict[str, np.ndarray] = field(default_factory=dict)
