"""Making sessions: a trainer from a config and a text, a session from a checkpoint (checked
against this server's limits before anything is allocated), a broken session for a
checkpoint that can't be read."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from rnnserve_server.config import Settings
from rnnserve_server.engine.model_config import EngineError, ModelConfig
from rnnserve_server.engine.rnn.kernels import param_shapes
from rnnserve_server.engine.trainer import Trainer, parameter_total
from rnnserve_server.engine.vocab import Vocab
from rnnserve_server.errors import (
    CheckpointError,
    CheckpointTooNewError,
    InvalidArgumentError,
    LimitExceededError,
    StorageError,
)
from rnnserve_server.logs import get_logger
from rnnserve_server.sessions.limits import check_alphabet_size, check_config_limits
from rnnserve_server.sessions.session import Session
from rnnserve_server.sessions.session_types import Broken
from rnnserve_server.storage.checkpoint import Checkpoint
from rnnserve_server.storage.store import Store

log = get_logger("rnnserve.registry")


def damaged(exc: BaseException) -> bool:
    """Whether a load failure means the file is unreadable or damaged (DATA_LOSS), not only
    refused by this server's limits (a CheckpointError with ``damaged=False``)."""
    return not isinstance(exc, CheckpointError) or exc.damaged


def public_reason(exc: BaseException) -> str:
    """Why a checkpoint can't be loaded, as clients see it: a sentence without paths or
    exception text (those go to the server log)."""
    if isinstance(exc, CheckpointError):
        return exc.public
    if isinstance(exc, EngineError):  # the engine's sentences name a field, never a path
        return f"its checkpoint could not be loaded: {str(exc)[:300]}"
    return "its checkpoint could not be loaded (the server log has the details)"


class SessionFactory:
    """Makes the sessions of one server: checked against its settings' limits, loaded from its
    store. Makes and checks; never registers (the registry does)."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store

    def check_config_limits(self, config: ModelConfig) -> None:
        """LimitExceededError when a hyperparameter is over its server limit."""
        check_config_limits(self.settings, config)

    def load(self, session_id: str, leave_newer: bool = False) -> Session:
        """The session kept in the store under ``session_id`` (I/O: call in a worker thread);
        a broken session if its checkpoint can't be loaded. ``leave_newer`` (cluster mode):
        a checkpoint of a newer format raises CheckpointTooNewError (a newer replica reads
        it) instead."""
        try:
            return Session.from_checkpoint(self.store.load(session_id, self.check_checkpoint))
        except StorageError:
            raise  # the store can't be reached now (cluster mode: Redis): the file is not bad
        except Exception as exc:  # a bad file must never stop the server
            if leave_newer and isinstance(exc, CheckpointTooNewError):
                raise  # a newer replica reads it
            error = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
            log.error("checkpoint_broken", session_id=session_id, error=error)
            try:
                mtime = self.store.mtime(session_id)
            except OSError:
                mtime = time.time()
            return Session.unloadable(session_id, Broken(public_reason(exc), damaged(exc)), mtime)

    def check_checkpoint(
        self, trainer_meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]
    ) -> None:
        """Refuse a checkpoint whose model is over this server's limits, or whose arrays are
        not the shapes its config implies, before anything is allocated (CheckpointError)."""
        try:
            config = ModelConfig.from_dict(dict(trainer_meta["config"]))
            alphabet = str(trainer_meta["alphabet"])
        except (EngineError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"bad model config in the checkpoint ({exc})",
                public="its checkpoint's model config is invalid",
            ) from None
        try:
            self.check_config_limits(config)
            check_alphabet_size(self.settings, len(alphabet))
        except LimitExceededError as exc:
            raise CheckpointError(
                f"checkpoint over this server's limits: {exc}",
                public=f"its model is larger than this server allows: {exc}",
                damaged=False,
            ) from None
        V, H, B = len(alphabet), config.hidden_size, config.batch_size
        expected = dict(param_shapes(V, H))
        tanh_rnn = set(expected) <= set(shapes)  # the seed's cell: every shape is known
        expected.update(hidden=(B, H), cursors=(B,))
        parameters = sum(int(np.prod(shape)) for shape in expected.values())
        if not tanh_rnn:  # other cells and layers: the weights, and a state (LSTM: h and c)
            # per layer. (A bound of 4 (H + V + 1)(H + V) a layer refused the layers above the
            # first, whose inputs are H wide, when H was large against V.)
            parameters = parameter_total(config, V) + 2 * config.num_layers * B * H
        for name, shape in shapes.items():
            want = expected.get(name) if tanh_rnn else None
            if name == "corpus":
                continue  # version 1: its length is bounded by the file's size
            # Optimizer state (unnamed here): at most one value per parameter.
            ok = int(np.prod(shape)) <= parameters if want is None else shape == want
            if not ok:
                raise CheckpointError(
                    f"checkpoint array {name!r} has shape {shape}, which its config "
                    f"(alphabet {V}, hidden {H}, batch {B}) does not allow",
                    public="its checkpoint is damaged (array shapes do not match its config)",
                )

    def from_checkpoint(self, ckpt: Checkpoint, changes: dict[str, Any]) -> Session:
        """A new session made from a checkpoint held in memory (an imported archive, a fork's
        copy) with ``changes`` to its settings, checked; nothing of it is on disk yet."""
        try:
            session = Session.from_checkpoint(ckpt)
            if changes:
                session.reconfigure(changes)
        except (EngineError, ValueError, TypeError) as exc:
            raise InvalidArgumentError(f"the session state is invalid: {exc}") from None
        trainer = session.require_trainer()
        if trainer.cursors.size and (
            int(trainer.cursors.min()) < 0 or int(trainer.cursors.max()) > trainer.train_length
        ):
            raise InvalidArgumentError(
                f"the session state is invalid: its strand cursors lie outside the "
                f"{trainer.train_length} characters trained on"
            )
        session.create_time = session.update_time = time.time()
        session.checkpoint.corpus_on_disk = None  # nothing on disk yet: the first write has it all
        session.checkpoint.step = -1
        session.checkpoint.dirty = True
        return session

    def build_trainer(self, config: ModelConfig, text: str, alphabet: str) -> Trainer:
        """A new trainer of ``config`` on ``text`` (compute: call in a worker thread)."""
        try:
            vocab = Vocab(alphabet) if alphabet else Vocab.from_text(text)
        except ValueError as exc:
            raise InvalidArgumentError(f"alphabet is invalid: {exc}") from None
        check_alphabet_size(self.settings, vocab.size)
        trainer = Trainer(config, vocab, vocab.encode(text))
        trainer.check_trainable()  # a new session starts with text to train on
        return trainer
