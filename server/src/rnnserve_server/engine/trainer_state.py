"""The trainer's state format (STATE_FORMAT): named arrays and a JSON-able dict that resume
a trainer bit for bit. The checkpoint schema around it is storage/checkpoint.py's."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .model_config import INT64_MAX, STATE_FORMAT, EngineError, ModelConfig
from .optimizers import Optimizer
from .vocab import Vocab

# The keys of the state's dict; "dropout_rng" is absent from states written before cells/.
_META_KEYS = frozenset({"format", "config", "alphabet", "step_count", "windows", "optim"})
_OPTIONAL_META_KEYS = frozenset({"dropout_rng"})


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


def _names(names: set[str]) -> str:
    return ", ".join(sorted(repr(n) for n in names))


def _counter(name: str, value: object) -> int:
    """A counter of the state: an integer from 0 to INT64_MAX (an Adam step count of -1 would
    divide by zero; the wire carries int64)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
        raise EngineError(f"trainer.{name} must be an integer from 0 to {INT64_MAX}")
    return value


def _same_keys(name: str, given: object, expected: object) -> None:
    """EngineError unless ``given`` has exactly the keys of ``expected``, at every level."""
    if not isinstance(expected, dict):
        return
    if not isinstance(given, dict) or set(given) != set(expected):
        raise EngineError(f"trainer.{name} must be an object with keys {_names(set(expected))}")
    for key, value in expected.items():
        _same_keys(f"{name}.{key}", given[key], value)


def read_header(meta: dict[str, Any]) -> tuple[ModelConfig, Vocab]:
    """The config and vocabulary a ``state_dict()`` meta describes (the trainer to build
    before ``restore``); EngineError if the meta is malformed or has a key this format does
    not have."""
    try:
        if meta.get("format") != STATE_FORMAT:
            raise EngineError(f"unsupported engine state format {meta.get('format')!r}")
        unknown = set(meta) - _META_KEYS - _OPTIONAL_META_KEYS
        if unknown:
            raise EngineError(f"unknown trainer key(s) {_names(unknown)}")
        config = ModelConfig.from_dict(dict(meta["config"]))
        if not isinstance(meta["alphabet"], str):
            raise EngineError("trainer.alphabet must be a string")
        return config, Vocab(meta["alphabet"])
    except KeyError as exc:
        raise EngineError(f"engine state is missing {exc}") from None


def restore(trainer: Resumable, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Load ``state_dict()`` output into a trainer built from its header, exactly (bit for
    bit). EngineError if the arrays do not match its config, the state is malformed, or it
    holds anything this format does not have (an unknown optimizer key or array): state the
    trainer can't restore is refused, never dropped."""
    config = trainer.config
    try:
        expected = {name: p for name, p in trainer.params.items()}
        expected["hidden"] = trainer.hidden
        expected["cursors"] = trainer.cursors
        for name, arr in trainer.optimizer.state_arrays().items():
            expected[f"optim.{name}"] = arr
        unknown = set(arrays) - set(expected) - {"corpus"}
        if unknown:
            raise EngineError(
                f"unknown array(s) {_names({'trainer.' + n for n in unknown})}: not part of the "
                f"state of a {config.num_layers}-layer {config.cell} model with {config.optimizer}"
            )
        for name, ref in expected.items():
            got = np.asarray(arrays[name])
            if got.shape != ref.shape or got.dtype != ref.dtype:
                raise EngineError(
                    f"engine state array {name!r} is {got.dtype}{got.shape}, "
                    f"expected {ref.dtype}{ref.shape}"
                )
        for name in trainer.params:
            np.copyto(trainer.params[name], arrays[name])
        if "dropout_rng" in meta:
            rng = trainer.dropout_rng.bit_generator
            _same_keys("dropout_rng", meta["dropout_rng"], rng.state)  # numpy ignores others
            try:
                rng.state = dict(meta["dropout_rng"])
            except (TypeError, ValueError, OverflowError, KeyError) as exc:
                raise EngineError(f"engine state 'dropout_rng' is invalid ({exc})") from None
        optim = meta["optim"]
        if not isinstance(optim, dict):
            raise EngineError("trainer.optim must be an object")
        known = set(trainer.optimizer.state_meta())
        if set(optim) != known:
            unknown, missing = set(optim) - known, known - set(optim)
            what = f"unknown key(s) {_names(unknown)}" if unknown else f"no {_names(missing)}"
            raise EngineError(
                f"trainer.optim has {what}: {config.optimizer}'s state has "
                f"{_names(known) or 'no keys'}"
            )
        trainer.optimizer.load_state(
            {
                k[len("optim.") :]: np.asarray(v)
                for k, v in arrays.items()
                if k.startswith("optim.")
            },
            {k: _counter(f"optim.{k}", v) for k, v in optim.items()},
        )
        trainer.hidden = np.array(arrays["hidden"], dtype=trainer.dtype)
        trainer.cursors = np.array(arrays["cursors"], dtype=np.int64)
        trainer.step_count = _counter("step_count", meta["step_count"])
        trainer.windows = _counter("windows", meta["windows"])
    except KeyError as exc:
        raise EngineError(f"engine state is missing {exc}") from None
