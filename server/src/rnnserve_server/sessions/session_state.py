"""The part of a session that turns into a checkpoint and back: loading a checkpoint's trainer
and history, and taking consistent copies to write, export or fork. ``Session`` (session.py)
inherits it; the fields below are Session's (see its ``__init__``)."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import numpy as np

from rnnserve_server.engine.trainer import Trainer
from rnnserve_server.storage.checkpoint import Checkpoint, CorpusRef


class SessionState:
    """Checkpoint <-> session state, under the session's ``lock``."""

    id: str
    lock: threading.Lock
    trainer: Trainer | None
    _hist: np.ndarray
    _n: int
    loss: float
    smoothed_loss: float
    validation: dict[int, float]
    validation_step: int
    validation_loss: float
    create_time: float
    update_time: float
    last_used: float
    checkpointed_step: int
    corpus_on_disk: CorpusRef | None
    dirty: bool
    broken_error: str | None

    def _refresh_summary(self) -> None:
        raise NotImplementedError  # Session's

    def require_trainer(self) -> Trainer:
        raise NotImplementedError  # Session's

    def attach(self, ckpt: Checkpoint) -> None:
        """Load a checkpoint's trainer and history into this (evicted) session."""
        trainer = Trainer.from_state(ckpt.trainer_arrays, ckpt.trainer_meta)
        with self.lock:
            self.trainer = trainer
            self._hist = np.array(ckpt.loss_history, dtype=np.float64)
            self._n = len(self._hist)
            self.loss = float(ckpt.meta.get("loss", 0.0))
            self.smoothed_loss = float(ckpt.meta.get("smoothed_loss", 0.0))
            self._load_validation(ckpt.meta.get("validation"))
            self.checkpointed_step = self._n
            self.corpus_on_disk = ckpt.corpus
            self.dirty = False
            self.broken_error = None
            self._refresh_summary()
        self.last_used = time.monotonic()

    def snapshot(self) -> Checkpoint | None:
        """A consistent copy of the state to write (worker thread); None when evicted.

        The corpus is copied only when it differs from ``corpus_on_disk`` (it only grows, so
        its length tells); otherwise the checkpoint refers to the corpus file on disk.
        """
        with self.lock:
            trainer = self.trainer
            if trainer is None:
                return None
            arrays, trainer_meta = trainer.state_dict(corpus=False)  # copies
            on_disk = self.corpus_on_disk
            if on_disk is None or on_disk.length != trainer.corpus_length:
                arrays["corpus"] = trainer.corpus.copy()
                on_disk = None
            meta = self._meta()
            history = self._hist[: self._n].copy()
        return Checkpoint(self.id, meta, arrays, trainer_meta, history, on_disk)

    def export_state(self) -> Checkpoint:
        """A consistent copy of everything, the corpus included (worker thread): what an
        archive or a fork holds."""
        with self.lock:
            trainer = self.require_trainer()
            arrays, trainer_meta = trainer.state_dict(corpus=True)  # copies
            meta = self._meta()
            history = self._hist[: self._n].copy()
        return Checkpoint(self.id, meta, arrays, trainer_meta, history)

    def _load_validation(self, value: Any) -> None:
        """Restore the validation losses from a checkpoint's ``[[step, loss], ...]``; entries
        that are not a (step within the history, finite loss) pair are dropped."""
        points: dict[int, float] = {}
        if isinstance(value, list):
            for item in value:
                if (
                    isinstance(item, list)
                    and len(item) == 2
                    and isinstance(item[0], int)
                    and 0 < item[0] <= self._n
                    and isinstance(item[1], int | float)
                    and math.isfinite(item[1])
                ):
                    points[item[0]] = float(item[1])
        self.validation = points
        if points:
            self.validation_step = max(points)
            self.validation_loss = points[self.validation_step]
        else:
            self.validation_step, self.validation_loss = 0, 0.0

    def _meta(self) -> dict[str, Any]:
        """The checkpoint's session fields (under ``lock``)."""
        return {
            "create_time": self.create_time,
            "update_time": self.update_time,
            "step": self._n,
            "loss": self.loss,
            "smoothed_loss": self.smoothed_loss,
            # [[step, loss], ...] in step order: the validation losses measured so far.
            "validation": [[k, v] for k, v in sorted(self.validation.items())],
        }
