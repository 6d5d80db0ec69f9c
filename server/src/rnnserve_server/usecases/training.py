"""The Train use case: N updates in chunks off the event loop, with progress, stop conditions,
the runaway guard, periodic checkpoints and metrics; no transport here."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from rnnserve_server import metrics
from rnnserve_server.config import Settings
from rnnserve_server.errors import InvalidArgumentError
from rnnserve_server.logs import get_logger
from rnnserve_server.sessions.registry import Registry
from rnnserve_server.sessions.session import ChunkResult, Session, StopCause, TrainPlan
from rnnserve_server.usecases.request_limits import RequestLimits, encode

log = get_logger("rnnserve.service")

CHUNK_SECONDS = 0.05  # training time per executor call: cancel/RPC latency vs overhead
PROGRESS_LOG_SECONDS = 10.0  # training progress is logged at most this often per Train
DEFAULT_EVAL_EVERY = 100  # validation every this many updates when neither interval is given
# The runaway guard: a loss above this many times the uniform baseline (ln V nats, what an
# untrained model scores) for a whole report window ends a Train as diverged.
RUNAWAY_FACTOR = 2.0


@dataclass(frozen=True)
class TrainOptions:
    """What a Train asks for (TrainRequest's fields)."""

    steps: int
    report_every: int = 0
    sample_length: int = 0
    sample_temperature: float = 1.0
    sample_prime: str = ""
    until_loss: float | None = None
    patience: int = 0
    eval_every: int = 0
    until_step: int | None = None  # instead of steps: train until the session is at this step


@dataclass
class TrainProgress:
    """One progress report; the last one has a stop_reason."""

    step: int
    steps_done: int
    loss: float
    smoothed_loss: float
    chars_per_second: float
    elapsed_seconds: float
    checkpointed_step: int
    validation_loss: float = 0.0
    validation_step: int = 0
    stop_reason: str | None = None  # completed|diverged|target_loss|early_stopped|deleted|shutdown
    sample: str | None = None


def check_options(o: TrainOptions, settings: Settings, limits: RequestLimits) -> None:
    """INVALID_ARGUMENT / RESOURCE_EXHAUSTED for options out of range."""
    s = settings
    if o.until_step is None:
        limits.check_count("steps", o.steps, 1, s.max_train_steps, "max_train_steps")
    elif o.steps:
        raise InvalidArgumentError(
            f"give steps or until_step, not both (steps {o.steps}, until_step {o.until_step})"
        )
    elif o.until_step < 1:
        raise InvalidArgumentError(f"until_step must be >= 1, not {o.until_step}")
    if o.report_every < 0:
        raise InvalidArgumentError(f"report_every must be >= 0, not {o.report_every}")
    limits.check_count(
        "sample_length", o.sample_length, 0, s.max_generate_length, "max_generate_length"
    )
    if o.until_loss is not None and (not math.isfinite(o.until_loss) or o.until_loss < 0):
        raise InvalidArgumentError(
            f"until_loss must be a finite number >= 0 (nats per character), not {o.until_loss}"
        )
    if o.patience < 0:
        raise InvalidArgumentError(f"patience must be >= 0 (0 is off), not {o.patience}")
    if o.eval_every < 0:
        raise InvalidArgumentError(
            f"eval_every must be >= 0 (0 follows report_every), not {o.eval_every}"
        )
    t = o.sample_temperature
    if not math.isfinite(t) or t < 0:
        raise InvalidArgumentError(
            f"sample_temperature must be a finite number >= 0 (0 is greedy), not {t}"
        )
    if o.sample_prime:
        limits.check_text(o.sample_prime, "sample_prime", min_chars=1)


def steps_to_go(
    o: TrainOptions, session: Session, settings: Settings, limits: RequestLimits
) -> int:
    """The updates a Train applies: ``steps``, or what is left to ``until_step`` (0 when the
    session is there already: a retry of a Train that completed)."""
    if o.until_step is None:
        return o.steps
    steps = max(0, o.until_step - session.step)
    limits.check_count(
        "the steps up to until_step", steps, 0, settings.max_train_steps, "max_train_steps"
    )
    return steps


async def sample_text(
    registry: Registry,
    session: Session,
    length: int,
    prime: np.ndarray | None = None,
    temperature: float = 1.0,
) -> str:
    """``length`` characters sampled after ``prime``, off the event loop."""
    start = prime if prime is not None else np.zeros(0, np.int32)

    def sample(trainer: Any) -> str:
        ids = np.concatenate(list(trainer.sample(start, length, temperature=temperature)))
        return str(trainer.vocab.decode(ids))

    return cast(str, await registry.run(session.with_trainer, sample))


async def train_chunk(
    registry: Registry, session: Session, max_steps: int, plan: TrainPlan | None = None
) -> ChunkResult:
    """One executor call of training that survives the handler being cancelled.

    On cancellation the running chunk is told to stop, awaited (so the session is
    consistent before the busy flag clears), and the cancellation re-raised.
    """
    future = asyncio.get_running_loop().run_in_executor(
        registry.compute, session.train_chunk, max_steps, CHUNK_SECONDS, plan
    )
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        session.request_stop(StopCause.CANCELLED)
        await asyncio.wait([future])
        session.notify()
        raise


async def train(
    registry: Registry, settings: Settings, limits: RequestLimits, session_id: str, o: TrainOptions
) -> AsyncGenerator[TrainProgress, None]:
    """Run o.steps updates in chunks off the event loop, yielding progress."""
    s = settings
    check_options(o, settings, limits)
    every = o.report_every
    async with registry.use(session_id) as session:
        steps = steps_to_go(o, session, settings, limits)
        trainer = session.require_trainer()
        sample_prime = (
            encode(session, o.sample_prime, "sample_prime")
            if o.sample_prime
            else np.zeros(0, dtype=np.int32)
        )
        has_validation = trainer.validation_length >= 2
        if not has_validation and (o.patience or o.eval_every):
            field = "patience" if o.patience else "eval_every"
            raise InvalidArgumentError(
                f"{field} needs a validation split, and session {session.id!r} has none; "
                "create a session with validation_fraction (e.g. 0.1); an existing "
                "session's split can't change"
            )
        vocab_size = trainer.vocab.size
        runaway = RUNAWAY_FACTOR * math.log(vocab_size) if vocab_size >= 2 else math.inf
        plan = TrainPlan(
            steps=steps,
            eval_every=(o.eval_every or every or DEFAULT_EVAL_EVERY) if has_validation else 0,
            until_loss=o.until_loss,
            patience=o.patience,
        )
        diverged = False

        async def sample() -> str:
            text = await sample_text(
                registry, session, o.sample_length, sample_prime, o.sample_temperature
            )
            return o.sample_prime + text

        def runaway_window() -> bool:
            """The guard: every loss since the last report above the runaway line."""
            high = plan.window_min > runaway
            plan.window_min = math.inf
            return high

        await registry.checkpoints.check_writable(session)
        limits.check_update_memory(session, "Train", o.sample_length)
        session.begin("Train")
        if o.until_step is not None:  # a Step may have run meanwhile: never train past it
            steps = plan.steps = min(steps, max(0, o.until_step - session.step))
        start = last_report = last_log = last_ckpt = time.monotonic()
        done = chars = 0
        first_step = session.step
        bound = log.bind(session_id=session.id, steps=steps)
        bound.info("train_started", step=first_step)

        def progress(reason: str | None = None) -> TrainProgress:
            elapsed = time.monotonic() - start
            return TrainProgress(
                step=session.step,
                steps_done=done,
                loss=session.losses.loss,
                smoothed_loss=session.losses.smoothed_loss,
                chars_per_second=chars / elapsed if elapsed > 0 else 0.0,
                elapsed_seconds=elapsed,
                stop_reason=reason,
                checkpointed_step=max(session.checkpoint.step, 0),
                validation_loss=session.losses.validation_loss
                if session.losses.validation_step
                else 0.0,
                validation_step=session.losses.validation_step,
            )

        try:
            while done < steps and not session.cancel.is_set() and plan.stop is None:
                limit = steps - done
                if every:
                    limit = min(limit, every - done % every)
                chunk = await train_chunk(registry, session, limit, plan)
                done += chunk.steps
                chars += chunk.chars
                metrics.record_training(chunk.steps, chunk.chars)
                session.notify()
                if chunk.error is not None:  # not applied: ends as STOP_REASON_DIVERGED
                    bound.warning("train_diverged", step=session.step, error=str(chunk.error))
                    diverged = True
                    break
                unsaved = registry.checkpoints.unsaved.get(session.id)
                if unsaved is not None:  # don't train on what can't be kept
                    bound.warning("train_unsaved", step=session.step, error=str(unsaved))
                    raise type(unsaved)(str(unsaved))
                now = time.monotonic()
                if now - last_ckpt >= s.checkpoint_interval:
                    registry.checkpoints.request(session)
                    last_ckpt = now
                if now - last_log >= PROGRESS_LOG_SECONDS:
                    bound.info(
                        "train_progress",
                        step=session.step,
                        done=done,
                        loss=round(session.losses.smoothed_loss, 4),
                    )
                    last_log = now
                due = (done % every == 0) if every else (now - last_report >= 1.0)
                if (due or done == steps) and chunk.steps and runaway_window():
                    diverged = True
                    bound.warning(
                        "train_runaway", step=session.step, loss=session.losses.loss, limit=runaway
                    )
                    break
                if due and done < steps and chunk.steps and plan.stop is None:
                    message = progress()
                    if o.sample_length:
                        message.sample = await sample()
                    last_report = now
                    yield message
            cause = session.stop_cause
            reason = "completed"
            if diverged:
                reason = "diverged"
            elif plan.stop == "target":
                reason = "target_loss"
            elif plan.stop == "early":
                reason = "early_stopped"
            elif done < steps:
                reason = "deleted" if cause is StopCause.DELETED else "shutdown"
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away, maybe while a progress message was being sent.
            session.request_stop(StopCause.CANCELLED)
            raise
        finally:
            session.end()
            session.notify()  # watchers waiting for the Train to end
            if not session.deleted:
                registry.checkpoints.request(session)
            elapsed = time.monotonic() - start
            bound.info(
                "train_finished",
                step=session.step,
                done=done,
                chars_per_second=round(chars / elapsed, 1) if elapsed > 0 else 0.0,
                cause=session.stop_cause.value,
            )
        if not session.deleted:
            await registry.checkpoints.flush(session)
        final = progress(reason)
        if o.sample_length and not session.deleted:
            final.sample = await sample()
        yield final
