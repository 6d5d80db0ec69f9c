"""What a model does without training: the notebook's predict, evaluation, the loss of a
held-out text and sampling, each from a zero state on the current weights, never touching the
training state. The Trainer owns one ``Inference`` over its weights."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from . import cells
from .model_config import EngineError
from .rnn.scoring import score as rnn_score
from .rnn.scoring import score_strands
from .sampler import draw, rnn_recurrence


def check_ids(ids: np.ndarray, vocab_size: int, what: str) -> np.ndarray:
    """``ids`` as a 1-D int32 array of ids in [0, vocab_size); EngineError naming ``what``
    otherwise."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise EngineError(f"{what} must be a 1-D array of character ids")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
        raise EngineError(f"{what} has ids outside the vocabulary [0, {vocab_size})")
    return arr.astype(np.int32, copy=False)


class Inference:
    """Inference on a model's weights: ``params`` are the trainer's (views it updates in
    place), ``spec`` None for the seed's tanh RNN, else the gated or stacked model's shape."""

    def __init__(
        self, spec: cells.Spec | None, params: dict[str, np.ndarray], vocab_size: int
    ) -> None:
        self.spec = spec
        self.params = params
        self.vocab_size = vocab_size

    def check_ids(self, ids: np.ndarray, what: str) -> np.ndarray:
        """``ids`` as a 1-D int32 array of valid ids; EngineError otherwise."""
        return check_ids(ids, self.vocab_size, what)

    def score(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, float]:
        """From a zero state: argmax after each input and the summed nats of the targets."""
        if self.spec is None:
            return rnn_score(self.params, inputs, targets)
        return cells.score(self.spec, self.params, inputs, targets)

    def predict(self, ids: np.ndarray) -> tuple[np.ndarray, float]:
        """The notebook's predict: from a zero state, the most likely next id at each position
        (int32, same length as ``ids``) and the mean nats per character, where the target after
        the last character is the first (``Hallo`` -> ``alloH``). EngineError for empty text."""
        seq = self.check_ids(ids, "text")
        if seq.shape[0] < 1:
            raise EngineError("text is empty: give at least 1 character to predict from")
        argmax, nats = self.score(seq, np.roll(seq, -1))
        return argmax, nats / seq.shape[0]

    def evaluate(self, ids: np.ndarray) -> float:
        """Mean nats per character of ``ids[1:]`` given the preceding characters, from a zero
        state, without updating anything. EngineError for fewer than 2 ids."""
        seq = self.check_ids(ids, "text")
        if seq.shape[0] < 2:
            raise EngineError("text must have at least 2 characters to evaluate")
        _, nats = self.score(seq[:-1], seq[1:])
        return float(nats / (seq.shape[0] - 1))

    def held_out_loss(self, tail: np.ndarray) -> float:
        """Mean nats per character of a held-out text (>= 2 int32 ids), from a zero state: a
        tail under 2 * 1024 characters as one strand (exactly ``evaluate``), a longer one as
        up to 64 strands of >= 1024 characters scored side by side, each from a zero state
        (see score_strands). Memory stays bounded."""
        held = tail.shape[0]
        if self.spec is not None:  # gated or stacked cells: one strand, in chunks
            return float(self.score(tail[:-1], tail[1:])[1] / (held - 1))
        return float(score_strands(self.params, tail) / (held - 1))

    def sample(
        self,
        prime: np.ndarray,
        length: int,
        temperature: float,
        top_k: int,
        seed: int | None,
        chunk_size: int,
        first: np.ndarray,
    ) -> Iterator[np.ndarray]:
        """Trainer.sample's contract; ``first`` is the input an empty prime starts from."""
        seq = self.check_ids(prime, "prime")
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise EngineError(f"length must be an integer >= 0, got {length!r}")
        if not math.isfinite(temperature) or temperature < 0:
            raise EngineError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise EngineError(f"top_k must be an integer >= 0 (0 = no limit), got {top_k!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise EngineError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        if seq.shape[0] == 0:
            if first.shape[0] == 0:  # a weights-only import before any AppendText
                raise EngineError(
                    "prime is empty and the session has no text to start from: give a prime"
                )
            seq = first.astype(np.int32)
        params = {name: p.copy() for name, p in self.params.items()}  # snapshot
        rng = np.random.default_rng(seed)
        if self.spec is not None:
            step = cells.recurrence(self.spec, params, seq)
            Wy = params["Wy"]  # (H, V)
        else:
            step = rnn_recurrence(params, seq)
            Wy = params["Why"].T  # (H, V)
        x = int(seq[-1])
        return draw(step, x, Wy, params["by"], length, float(temperature), top_k, rng, chunk_size)
