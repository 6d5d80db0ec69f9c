"""A Train's plan, which is a training job's spec: what it asks for, checked in one place
before anything runs.

``TrainingPlan`` holds plain values only (``to_dict``/``from_dict`` round-trip through JSON): a
job's record keeps it as its spec (sessions/job_record.py). ``check`` refuses what no session could
run (before the session is looked up); ``fit`` checks it against the session it runs on and
resolves what the run needs (``FittedPlan``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from rnnserve_server.engine.schedule import DECAYS, LearningRateSchedule
from rnnserve_server.errors import InvalidArgumentError
from rnnserve_server.sessions.session import Session
from rnnserve_server.usecases.request_limits import RequestLimits, encode

DEFAULT_EVAL_EVERY = 100  # validation every this many updates when neither interval is given
# The runaway guard: a loss above this many times the uniform baseline (ln V nats, what an
# untrained model scores) for a whole report window ends a Train as diverged.
RUNAWAY_FACTOR = 2.0


@dataclass(frozen=True)
class TrainingPlan:
    """What one Train or training job asks for (TrainRequest's fields, JobSpec's)."""

    steps: int = 0  # updates to apply; 0 with until_step
    until_step: int | None = None  # instead of steps: train until the session is at this step
    until_loss: float | None = None  # stop once the (validation or smoothed) loss is <= this
    patience: int = 0  # stop after this many evaluations without a new best; 0 never
    eval_every: int = 0  # validation loss every this many updates; 0 follows report_every
    report_every: int = 0  # a progress report every this many updates; 0 about every second
    sample_length: int = 0  # characters sampled with each report; 0 none
    sample_temperature: float = 1.0
    sample_prime: str = ""  # the text samples start after
    max_seconds: float = 0.0  # a job's training-time budget across restarts; 0 none
    warmup_steps: int = 0  # the schedule's linear warm-up (updates)
    decay: str = "constant"  # the schedule's decay after it: constant, cosine or linear
    min_learning_rate: float | None = None  # where the decay ends; None: a tenth of the peak
    restore_best: bool = False  # end at the weights of the best validation loss

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-able values."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingPlan:
        """Inverse of ``to_dict`` (unchecked: ``check`` it before running); unknown keys
        (a newer server's) are left out."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def schedule(self) -> LearningRateSchedule | None:
        """The learning-rate schedule, None when the rate stays the session's."""
        if not self.warmup_steps and self.decay == "constant":
            return None
        return LearningRateSchedule(self.warmup_steps, self.decay, self.min_learning_rate)

    def check(self, limits: RequestLimits) -> None:
        """INVALID_ARGUMENT / RESOURCE_EXHAUSTED for values out of range on any session."""
        s = limits.settings
        if self.until_step is None:
            limits.check_count("steps", self.steps, 1, s.max_train_steps, "max_train_steps")
        elif self.steps:
            raise InvalidArgumentError(
                f"give steps or until_step, not both (steps {self.steps}, "
                f"until_step {self.until_step})"
            )
        elif self.until_step < 1:
            raise InvalidArgumentError(f"until_step must be >= 1, not {self.until_step}")
        if self.report_every < 0:
            raise InvalidArgumentError(f"report_every must be >= 0, not {self.report_every}")
        limits.check_count(
            "sample_length", self.sample_length, 0, s.max_generate_length, "max_generate_length"
        )
        until_loss = self.until_loss
        if until_loss is not None and (not math.isfinite(until_loss) or until_loss < 0):
            raise InvalidArgumentError(
                f"until_loss must be a finite number >= 0 (nats per character), not {until_loss}"
            )
        if self.patience < 0:
            raise InvalidArgumentError(f"patience must be >= 0 (0 is off), not {self.patience}")
        if self.eval_every < 0:
            raise InvalidArgumentError(
                f"eval_every must be >= 0 (0 follows report_every), not {self.eval_every}"
            )
        t = self.sample_temperature
        if not math.isfinite(t) or t < 0:
            raise InvalidArgumentError(
                f"sample_temperature must be a finite number >= 0 (0 is greedy), not {t}"
            )
        if self.sample_prime:
            limits.check_text(self.sample_prime, "sample_prime", min_chars=1)
        if not math.isfinite(self.max_seconds) or self.max_seconds < 0:
            raise InvalidArgumentError(
                f"max_seconds must be a finite number >= 0 (0 is no budget), not {self.max_seconds}"
            )
        if self.warmup_steps < 0:
            raise InvalidArgumentError(
                f"schedule.warmup_steps must be >= 0, not {self.warmup_steps}"
            )
        if self.decay not in DECAYS:
            raise InvalidArgumentError(f"schedule.decay must be one of {DECAYS}, not {self.decay}")
        low = self.min_learning_rate
        if low is not None and (not math.isfinite(low) or low < 0):
            raise InvalidArgumentError(
                f"schedule.min_learning_rate must be a finite number >= 0, not {low}"
            )

    def fit(self, session: Session, limits: RequestLimits) -> FittedPlan:
        """The plan on ``session`` (loaded): the updates left to apply, the evaluation
        schedule, the sample prime's ids, the runaway line; refused if the session can't run
        it (until_step too far, no validation split, unknown characters, working memory)."""
        steps = self.steps
        if self.until_step is not None:  # 0 when the session is there already (a retry)
            steps = max(0, self.until_step - session.step)
            limits.check_count(
                "the steps up to until_step",
                steps,
                0,
                limits.settings.max_train_steps,
                "max_train_steps",
            )
        trainer = session.require_trainer()
        prime = (
            encode(session, self.sample_prime, "sample_prime")
            if self.sample_prime
            else np.zeros(0, dtype=np.int32)
        )
        has_validation = trainer.validation_length >= 2
        if not has_validation and (self.patience or self.eval_every or self.restore_best):
            field = "patience" if self.patience else "eval_every"
            field = "restore_best" if self.restore_best else field
            raise InvalidArgumentError(
                f"{field} needs a validation split, and session {session.id!r} has none; "
                "create a session with validation_fraction (e.g. 0.1); an existing "
                "session's split can't change"
            )
        limits.check_update_memory(session, "Train", self.sample_length)
        vocab_size = trainer.vocab.size
        return FittedPlan(
            plan=self,
            steps=steps,
            eval_every=(
                (self.eval_every or self.report_every or DEFAULT_EVAL_EVERY)
                if has_validation
                else 0
            ),
            sample_prime=prime,
            runaway=RUNAWAY_FACTOR * math.log(vocab_size) if vocab_size >= 2 else math.inf,
        )


@dataclass(frozen=True)
class FittedPlan:
    """A plan checked against its session, with what running it needs."""

    plan: TrainingPlan
    steps: int  # updates to apply (until_step resolved)
    eval_every: int  # validation loss every this many updates; 0 without a validation split
    sample_prime: np.ndarray  # the prime's ids
    runaway: float  # the runaway guard's line: RUNAWAY_FACTOR x the uniform baseline
