"""The trainer's state format (STATE_FORMAT): named arrays and a JSON-able dict that resume
a trainer bit for bit. The checkpoint schema around it is checkpoint.py's."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .model_config import STATE_FORMAT, EngineError, ModelConfig
from .vocab import Vocab

if TYPE_CHECKING:
    from .trainer import Trainer


def state_dict(
    self: Trainer, *, corpus: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Everything needed to resume exactly: named arrays (copies) and a JSON-able dict.

    ``corpus=False`` leaves out the corpus (checkpoints keep it in its own file, copied
    only when it changed); ``from_state`` needs it back as ``arrays["corpus"]``.
    """
    arrays: dict[str, np.ndarray] = {name: p.copy() for name, p in self.params.items()}
    for name, arr in self._optimizer.state_arrays().items():
        arrays[f"optim.{name}"] = arr
    arrays["hidden"] = self.hidden.copy()
    arrays["cursors"] = self.cursors.copy()
    if corpus:
        arrays["corpus"] = self._corpus[: self.corpus_length].astype(np.int32)
    meta: dict[str, Any] = {
        "format": STATE_FORMAT,
        "config": self.config.to_dict(),
        "alphabet": self.vocab.alphabet,
        "step_count": self.step_count,
        "windows": self.windows,
        "optim": self._optimizer.state_meta(),
        "dropout_rng": self._dropout_rng.bit_generator.state,
    }
    return arrays, meta


def from_state(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Trainer:
    from .trainer import Trainer  # the module that defines it imports this one

    """Rebuild a trainer from ``state_dict()`` output, exactly (bit for bit).

    EngineError if the state is malformed or its arrays do not match its config.
    """
    try:
        if meta.get("format") != STATE_FORMAT:
            raise EngineError(f"unsupported engine state format {meta.get('format')!r}")
        config = ModelConfig.from_dict(dict(meta["config"]))
        vocab = Vocab(str(meta["alphabet"]))
        trainer = Trainer(config, vocab, np.asarray(arrays["corpus"]))
        expected = {name: p for name, p in trainer.params.items()}
        expected["hidden"] = trainer.hidden
        expected["cursors"] = trainer.cursors
        for name, arr in trainer._optimizer.state_arrays().items():
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
        if "dropout_rng" in meta:  # absent from checkpoints written before cells.py
            try:
                trainer._dropout_rng.bit_generator.state = dict(meta["dropout_rng"])
            except (TypeError, ValueError, OverflowError, KeyError) as exc:
                raise EngineError(f"engine state 'dropout_rng' is invalid ({exc})") from None
        trainer._optimizer.load_state(
            {
                k[len("optim.") :]: np.asarray(v)
                for k, v in arrays.items()
                if k.startswith("optim.")
            },
            dict(meta["optim"]),
        )
        trainer.hidden = np.array(arrays["hidden"], dtype=trainer._dtype)
        trainer.cursors = np.array(arrays["cursors"], dtype=np.int64)
        trainer.step_count = int(meta["step_count"])
        trainer.windows = int(meta["windows"])
    except KeyError as exc:
        raise EngineError(f"engine state is missing {exc}") from None
    return trainer
