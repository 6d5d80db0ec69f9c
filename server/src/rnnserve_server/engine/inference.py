"""What a trainer does without training: the notebook's predict, evaluation, the validation
loss and sampling, each from a zero state and without touching the training state. ``Trainer``
(model.py) inherits it; the fields below are the Trainer's."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from . import cells
from .model_config import EngineError
from .rnn.sampler import _sample
from .rnn.scoring import _score_strands


class TrainerInference:
    """Inference on a Trainer's current weights."""

    params: dict[str, np.ndarray]
    corpus_length: int
    _corpus: np.ndarray
    _spec: cells.Spec | None

    @property
    def validation_length(self) -> int:
        raise NotImplementedError  # Trainer's

    def _check_ids(self, ids: np.ndarray, what: str) -> np.ndarray:
        raise NotImplementedError  # Trainer's

    def _score(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, float]:
        raise NotImplementedError  # Trainer's

    def predict(self, ids: np.ndarray) -> tuple[np.ndarray, float]:
        """The notebook's predict: from a zero state, the most likely next id at each position
        (int32, same length as ``ids``) and the mean nats per character, where the target after
        the last character is the first (``Hallo`` -> ``alloH``). EngineError for empty text."""
        seq = self._check_ids(ids, "text")
        if seq.shape[0] < 1:
            raise EngineError("text is empty: give at least 1 character to predict from")
        argmax, nats = self._score(seq, np.roll(seq, -1))
        return argmax, nats / seq.shape[0]

    def evaluate(self, ids: np.ndarray) -> float:
        """Mean nats per character of ``ids[1:]`` given the preceding characters, from a zero
        state, without updating anything. EngineError for fewer than 2 ids."""
        seq = self._check_ids(ids, "text")
        if seq.shape[0] < 2:
            raise EngineError("text must have at least 2 characters to evaluate")
        _, nats = self._score(seq[:-1], seq[1:])
        return float(nats / (seq.shape[0] - 1))

    def validation_loss(self) -> float | None:
        """Mean nats per character over the held-out tail, from a zero state: a tail under
        2 * 1024 characters as one strand (exactly ``evaluate``), a longer one as up to 64
        strands of >= 1024 characters scored side by side, each from a zero state (see
        _score_strands). Memory stays bounded. None without a validation split."""
        held = self.validation_length
        if held < 2:
            return None
        tail = self._corpus[self.corpus_length - held : self.corpus_length].astype(np.int32)
        if self._spec is not None:  # gated or stacked cells: one strand, in chunks
            return float(self._score(tail[:-1], tail[1:])[1] / (held - 1))
        return float(_score_strands(self.params, tail) / (held - 1))

    def sample(
        self,
        prime: np.ndarray,
        length: int,
        temperature: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        chunk_size: int = 256,
    ) -> Iterator[np.ndarray]:
        """Generate ``length`` ids after ``prime``, yielded in int32 chunks of ``chunk_size``.

        From a zero state, the hidden state is warmed on ``prime`` (empty prime: ``corpus[0]`` is
        the first input, and is not yielded); then each id is drawn from
        softmax(y / temperature) restricted to the ``top_k`` most likely ids (0 = all).
        Temperature 0 takes the argmax. Uses its own Generator seeded with ``seed`` (same seed,
        same weights -> same text) and a snapshot of the weights taken now, so it never touches
        the training state. Arguments are checked now (EngineError), not at the first chunk.
        """
        seq = self._check_ids(prime, "prime")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise EngineError(f"length must be an integer >= 0, got {length!r}")
        if not math.isfinite(temperature) or temperature < 0:
            raise EngineError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise EngineError(f"top_k must be an integer >= 0 (0 = no limit), got {top_k!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise EngineError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        if seq.shape[0] == 0:
            seq = self._corpus[:1].astype(np.int32)
        params = {name: p.copy() for name, p in self.params.items()}  # snapshot
        rng = np.random.default_rng(seed)
        if self._spec is not None:
            return cells.sample(
                self._spec, params, seq, length, float(temperature), top_k, rng, chunk_size
            )
        return _sample(params, seq, length, float(temperature), top_k, rng, chunk_size)
