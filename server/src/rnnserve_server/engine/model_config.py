"""Model configuration: the hyperparameters, their validation and presets, the errors of
the engine, and what one update reports."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .cells import CELLS, GATES
from .optimizers import OPTIMIZERS

PARAM_NAMES = ("Wxh", "Whh", "Why", "bh", "by")
DTYPES = ("float32", "float64")
STATE_FORMAT = 1
MAX_VALIDATION_FRACTION = 0.5
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
# Settings that can change on a live trainer (Trainer.reconfigure); the rest fix the weights'
# shapes or the corpus feed.
MUTABLE_FIELDS = ("learning_rate", "clip", "reset_every", "optimizer")


class EngineError(ValueError):
    """Bad configuration or text; the message names the field and says how to fix it."""


class DivergedError(ArithmeticError):
    """The loss, the gradient or the updated weights were not finite; nothing was changed."""


def nats_to_bits(nats: float) -> float:
    """Convert a loss in nats per character to bits per character."""
    return nats / math.log(2.0)


# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of one model. ``validate`` checks them; the constructor does not."""

    hidden_size: int
    seq_length: int
    batch_size: int
    learning_rate: float
    optimizer: str  # "sgd" | "adagrad" | "adam"
    clip: float = 5.0  # gradients are clipped element-wise to [-clip, clip]
    seed: int = 0  # seeds the weight initialisation
    dtype: str = "float32"  # "float32" | "float64"
    reset_every: int = 0  # zero the carried hidden states every N corpus windows; 0 = never
    cell: str = "rnn"  # "rnn" | "lstm" | "gru" (cells/); one-layer "rnn" is the seed's model
    num_layers: int = 1  # stacked recurrent layers
    dropout: float = 0.0  # between layers, training only: share of a layer's outputs zeroed
    validation_fraction: float = 0.0  # share of the corpus, at its end, never trained on

    def validate(self) -> None:
        """Raise EngineError naming the first invalid field and the values it accepts."""

        def positive_int(name: str, value: object, low: int = 1, high: int | None = None) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise EngineError(f"{name} must be an integer >= {low}, got {value!r}")
            if high is not None and value > high:
                raise EngineError(f"{name} must be an integer from {low} to {high}, got {value}")

        positive_int("hidden_size", self.hidden_size)
        positive_int("seq_length", self.seq_length)
        positive_int("batch_size", self.batch_size)
        # The wire's integer types (int64 seed, int32 reset_every) bound what a file may hold.
        positive_int("seed", self.seed, 0, INT64_MAX)
        positive_int("reset_every", self.reset_every, 0, INT32_MAX)
        for name in ("learning_rate", "clip"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise EngineError(f"{name} must be a positive finite number, got {value!r}")
        frac = self.validation_fraction
        if (
            isinstance(frac, bool)
            or not isinstance(frac, int | float)
            or not math.isfinite(frac)
            or not 0.0 <= frac <= MAX_VALIDATION_FRACTION
        ):
            raise EngineError(
                f"validation_fraction must be a number from 0 to {MAX_VALIDATION_FRACTION}, "
                f"got {frac!r}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise EngineError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.dtype not in DTYPES:
            raise EngineError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.cell not in CELLS:
            raise EngineError(f"cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        positive_int("num_layers", self.num_layers)
        d = self.dropout
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 <= d < 1:
            raise EngineError(f"dropout must be a number in [0, 1), got {d!r}")
        if d > 0 and self.num_layers < 2:
            raise EngineError(
                "dropout applies between layers: set num_layers >= 2, or dropout to 0"
            )

    @property
    def recurrent_weights(self) -> int:
        """Weights that do not depend on the alphabet: every layer's Wh, and the input
        weights of the layers above the first (what num_layers and hidden_size multiply)."""
        H = self.hidden_size
        gates = GATES.get(self.cell, 1) * H
        return self.num_layers * H * gates + (self.num_layers - 1) * H * gates

    @property
    def stacked(self) -> bool:
        """True when the model is cells/' (gated cell or several layers), not the seed's."""
        return self.cell != "rnn" or self.num_layers > 1

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Inverse of ``to_dict``; EngineError for unknown or missing fields or bad values."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise EngineError(f"unknown model config field(s): {', '.join(unknown)}")
        try:
            config = cls(**data)
        except TypeError as exc:
            raise EngineError(f"incomplete model config: {exc}") from None
        config.validate()
        return config

    @staticmethod
    def check_changes(changes: dict[str, Any]) -> None:
        """EngineError naming the first invalid value among ``changes`` to MUTABLE_FIELDS
        (their validity does not depend on the other fields)."""
        fixed = sorted(set(changes) - set(MUTABLE_FIELDS))
        if fixed:
            raise EngineError(f"{', '.join(fixed)} can't change on an existing trainer")
        PRESETS["default"].replace(**changes).validate()

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (not validated)."""
        return replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
    # Chosen with bench/quality.py on three corpora (BENCHMARKS.md "Quality of the presets"):
    # two GRU layers of 128 with dropout 0.25. With the C kernel one GRU layer of 128 trains
    # tiny Shakespeare's 1 MB fifty times in 5 minutes and over-fits (1.614 after 1 minute,
    # 1.636 after 5); the dropout between two layers keeps it improving (1.632, 1.564) at a
    # Step well under 50 ms. The tanh RNN of 128 (the default until 2026-12-08) read 1.749 /
    # 1.729 / 1.739 after 1 / 5 / 20 minutes.
    "default": ModelConfig(
        hidden_size=128,
        seq_length=50,
        batch_size=32,
        learning_rate=3e-3,
        optimizer="adam",
        reset_every=10,
        cell="gru",
        num_layers=2,
        dropout=0.25,
    ),
    # The notebook seed: learns `Hallo` -> `alloH`; diverges on real text.
    "notebook": ModelConfig(
        hidden_size=100, seq_length=5, batch_size=1, learning_rate=0.1, optimizer="sgd"
    ),
    # Karpathy's min-char-rnn.
    "min-char-rnn": ModelConfig(
        hidden_size=100, seq_length=25, batch_size=1, learning_rate=0.1, optimizer="adagrad"
    ),
    # Best held-out loss on tiny Shakespeare at 300 s and at 1,200 s on an idle 2-core machine
    # (bench/quality.py through the service, BENCHMARKS.md "Gated cells"): 2 x GRU 256 with
    # dropout 0.25, 1.551 / 1.538 nats; one GRU 256 1.578 / 1.607 (over-fits past ~10 epochs),
    # one GRU 384 1.566 at 300 s; LSTMs and the tanh default did worse. A cosine learning-rate
    # decay (a job's schedule, not a preset field) took it to 1.520 after 4.5 M characters.
    "quality": ModelConfig(
        hidden_size=256,
        seq_length=50,
        batch_size=32,
        learning_rate=3e-3,
        optimizer="adam",
        reset_every=10,
        cell="gru",
        num_layers=2,
        dropout=0.25,
    ),
}


@dataclass(frozen=True)
class StepResult:
    """What one optimizer update did."""

    step: int  # step count after the update
    loss: float  # mean nats per character
    grad_norm: float  # global L2 norm of the gradients before clipping
    chars: int  # characters trained on (batch_size * seq_length for a corpus step)

    @property
    def bits(self) -> float:
        """The loss in bits per character."""
        return nats_to_bits(self.loss)
