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
from rnnserve_server.errors import LeaseLostError
from rnnserve_server.logs import get_logger
from rnnserve_server.sessions.registry import Registry
from rnnserve_server.sessions.session import Session
from rnnserve_server.sessions.session_types import ChunkResult, StopCause, TrainRun
from rnnserve_server.usecases.request_limits import RequestLimits
from rnnserve_server.usecases.training_plan import TrainingPlan

log = get_logger("rnnserve.service")

CHUNK_SECONDS = 0.05  # training time per executor call: cancel/RPC latency vs overhead
PROGRESS_LOG_SECONDS = 10.0  # training progress is logged at most this often per Train


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
    registry: Registry, session: Session, max_steps: int, run: TrainRun | None = None
) -> ChunkResult:
    """One executor call of training that survives the handler being cancelled.

    On cancellation the running chunk is told to stop, awaited (so the session is
    consistent before the busy flag clears), and the cancellation re-raised.
    """
    future = asyncio.get_running_loop().run_in_executor(
        registry.compute, session.train_chunk, max_steps, CHUNK_SECONDS, run
    )
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        session.request_stop(StopCause.CANCELLED)
        await asyncio.wait([future])
        session.notify()
        raise


async def train(
    registry: Registry, limits: RequestLimits, session_id: str, plan: TrainingPlan
) -> AsyncGenerator[TrainProgress, None]:
    """Run the plan's updates in chunks off the event loop, yielding progress."""
    plan.check(limits)
    every = plan.report_every
    async with registry.use(session_id) as session:
        fitted = plan.fit(session, limits)
        steps = fitted.steps
        run = TrainRun(
            steps=steps,
            eval_every=fitted.eval_every,
            until_loss=plan.until_loss,
            patience=plan.patience,
        )
        diverged = False

        async def sample() -> str:
            text = await sample_text(
                registry, session, plan.sample_length, fitted.sample_prime, plan.sample_temperature
            )
            return plan.sample_prime + text

        def runaway_window() -> bool:
            """The guard: every loss since the last report above the runaway line."""
            high = run.window_min > fitted.runaway
            run.window_min = math.inf
            return high

        await registry.checkpoints.check_writable(session)
        session.begin("Train")
        if plan.until_step is not None:  # a Step may have run meanwhile: never train past it
            steps = run.steps = min(steps, max(0, plan.until_step - session.step))
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
            while done < steps and not session.cancel.is_set() and run.stop is None:
                limit = steps - done
                if every:
                    limit = min(limit, every - done % every)
                chunk = await train_chunk(registry, session, limit, run)
                done += chunk.steps
                chars += chunk.chars
                elapsed = time.monotonic() - start
                if elapsed > 0:
                    session.chars_per_second = chars / elapsed
                metrics.record_training(chunk.steps, chunk.chars, session.id)
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
                if now - last_ckpt >= registry.settings.checkpoint_interval:
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
                        "train_runaway",
                        step=session.step,
                        loss=session.losses.loss,
                        limit=fitted.runaway,
                    )
                    break
                if due and done < steps and chunk.steps and run.stop is None:
                    message = progress()
                    if plan.sample_length:
                        message.sample = await sample()
                    last_report = now
                    yield message
            cause = session.stop_cause
            reason = "completed"
            if diverged:
                reason = "diverged"
                metrics.record_divergence()
            elif run.stop == "target":
                reason = "target_loss"
            elif run.stop == "early":
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
        if session.stop_cause is StopCause.LEASE_LOST:  # what it trained here is not kept
            raise LeaseLostError.moved(session.id)
        final = progress(reason)
        if plan.sample_length and not session.deleted:
            final.sample = await sample()
        yield final
