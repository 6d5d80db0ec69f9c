"""The trainer's state format (STATE_FORMAT): named arrays and a JSON-able dict that resume
a trainer bit for bit. The checkpoint schema around it is storage/checkpoint.py's."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .model_config import STATE_FORMAT, EngineError, ModelConfig
from .optimizers import Optimizer
from .vocab import Vocab


class Resumable(Protocol):
    """What a trainer's state is made of (the Trainer's attributes)."""

    config: ModelConfig
    vocab: Vocab
    params: dict[str, np.ndarray]
    hidden: np.ndarray
    cursors: np.ndarray
    step_count: int
    windows: int
    dropout_rng: np.random.Generator
    dtype: np.dtype

    @property
    def optimizer(self) -> Optimizer: ...

    @property
    def corpus(self) -> np.ndarray: ...


def state_dict(
    trainer: Resumable, *, corpus: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Everything needed to resume exactly: named arrays (copies) and a JSON-able dict.

    ``corpus=False`` leaves out the corpus (checkpoints keep it in its own file, copied
    only when it changed); ``restore`` needs it back as ``arrays["corpus"]``.
    """
    arrays: dict[str, np.ndarray] = {name: p.copy() for name, p in trainer.params.items()}
    for name, arr in trainer.optimizer.state_arrays().items():
        arrays[f"optim.{name}"] = arr
    arrays["hidden"] = trainer.hidden.copy()
    arrays["cursors"] = trainer.cursors.copy()
    if corpus:
        arrays["corpus"] = trainer.corpus.astype(np.int32)
    meta: dict[str, Any] = {
        "format": STATE_FORMAT,
        "config": trainer.config.to_dict(),
        "alphabet": trainer.vocab.alphabet,
        "step_count": trainer.step_count,
        "windows": trainer.windows,
        "optim": trainer.optimizer.state_meta(),
        "dropout_rng": trainer.dropout_rng.bit_generator.state,
    }
    return arrays, meta


def read_header(meta: dict[str, Any]) -> tuple[ModelConfig, Vocab]:
    """The config and vocabulary a ``state_dict()`` meta describes (the trainer to build
    before ``restore``); EngineError if the meta is malformed."""
    try:
        if meta.get("format") != STATE_FORMAT:
            raise EngineError(f"unsupported engine state format {meta.get('format')!r}")
        return ModelConfig.from_dict(dict(meta["config"])), Vocab(str(meta["alphabet"]))
    except KeyError as exc:
        raise EngineError(f"engine state is missing {exc}") from None


def restore(trainer: Resumable, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Load ``state_dict()`` output into a trainer built from its header, exactly (bit for
    bit); EngineError if the arrays do not match its config or the state is malformed."""
    try:
        expected = {name: p for name, p in trainer.params.items()}
        expected["hidden"] = trainer.hidden
        expected["cursors"] = trainer.cursors
        for name, arr in trainer.optimizer.state_arrays().items():
            expected[f"optim.{name}"] = arr
        for name, ref in expected.items():
            got = np.asarray(arrays[name])
            if got.shape != ref.shape or got.dtype != ref.dtype:
                raise EngineError(
                    f"engine state array {name!r} is {got.dtype}{got.shape}, "
                    f"expected {ref.dtype}{ref.shape}"
                )
        for name in trainer.params:
            np.copyto(trainer.params[name], arrays[name])
        if "dropout_rng" in meta:  # absent from checkpoints written before the gated cells
            try:
                trainer.dropout_rng.bit_generator.state = dict(meta["dropout_rng"])
            except (TypeError, ValueError, OverflowError, KeyError) as exc:
                raise EngineError(f"engine state 'dropout_rng' is invalid ({exc})") from None
        trainer.optimizer.load_state(
            {
                k[len("optim.") :]: np.asarray(v)
                for k, v in arrays.items()
                if k.startswith("optim.")
            },
            dict(meta["optim"]),
        )
        trainer.hidden = np.array(arrays["hidden"], dtype=trainer.dtype)
        trainer.cursors = np.array(arrays["cursors"], dtype=np.int64)
        trainer.step_count = int(meta["step_count"])
        trainer.windows = int(meta["windows"])
    except KeyError as exc:
        raise EngineError(f"engine state is missing {exc}") from None
