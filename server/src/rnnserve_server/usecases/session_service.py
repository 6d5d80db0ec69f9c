"""The use cases of rnnserve, with no transport: create, get, list, delete, append, step,
train, watch, generate, predict, update, export, import and fork a session.

This layer owns the lifecycle the RPCs share: busy/ready (``Session.begin``/``end``),
checkpoint requests (write-behind, or flushed before an acknowledgement), notifications to
watchers, and the metrics hooks. It raises the domain errors of errors.py (and the engine's
EngineError/DivergedError); api/status.py maps them to gRPC status codes in one place.
"""

from __future__ import annotations

import builtins
import contextlib
import math
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import structlog

from rnnserve_server import metrics
from rnnserve_server.config import Settings
from rnnserve_server.engine import budget
from rnnserve_server.engine.model_config import MUTABLE_FIELDS, DivergedError, ModelConfig
from rnnserve_server.engine.vocab import UnknownCharactersError, utf8_size
from rnnserve_server.errors import CheckpointError, InvalidArgumentError
from rnnserve_server.logs import get_logger
from rnnserve_server.sessions.limits import limit_error
from rnnserve_server.sessions.registry import Registry
from rnnserve_server.sessions.session import Session
from rnnserve_server.storage import archive
from rnnserve_server.storage.checkpoint import validate_session_id
from rnnserve_server.usecases.request_limits import RequestLimits, encode
from rnnserve_server.usecases.training import Jobs, TrainProgress
from rnnserve_server.usecases.training_plan import TrainingPlan

__all__ = [
    "FIXED_FIELDS",
    "GenerateOptions",
    "SessionService",
    "StepOutcome",
    "TrainProgress",
    "TrainingPlan",
    "fixed_field_error",
]

log = get_logger("rnnserve.service")

WATCH_BATCH = 1000  # most loss points in one WatchLoss message
# Generate sends its first GENERATE_CHUNK characters as soon as they exist, then doubles the
# message size up to GENERATE_MAX_CHUNK: each message costs a thread hop and GIL hand-offs
# that slowed sampling by >10 % at 512 characters a message (bench/service.py, BENCHMARKS.md).
GENERATE_CHUNK = 256
GENERATE_MAX_CHUNK = 8192

# Settings that shape the weights or the data: neither UpdateSession nor ForkSession changes
# them (fork copies the weights, so it keeps them too).
FIXED_FIELDS = ("hidden_size", "seq_length", "batch_size", "dtype", "seed", "validation_fraction")


def fixed_field_error(name: str, verb: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"config.{name} can't be changed by {verb}: the session's weights, corpus split or "
        f"feed depend on it; only {', '.join('config.' + f for f in MUTABLE_FIELDS)} can. "
        "To try another value without losing this session, fork it (rnnserve fork ID NEWID) "
        f"and change the mutable settings there, or create a new session with the {name} "
        "you want"
    )


@dataclass(frozen=True)
class GenerateOptions:
    """What a Generate asks for."""

    length: int
    prime: str = ""
    temperature: float = 1.0
    top_k: int = 0
    seed: int | None = None  # None: a random one


@dataclass(frozen=True)
class StepOutcome:
    """One update's result, and the last step on disk."""

    step: int
    loss: float
    grad_norm: float
    chars: int
    checkpointed_step: int
    replayed: bool = False  # until_step was reached already: nothing trained


def _bind(session_id: str) -> None:
    structlog.contextvars.bind_contextvars(session_id=session_id[:80])


class SessionService:
    """The use cases over a Registry (sessions in memory and in the Store)."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry
        self.limits = RequestLimits(settings)
        self.jobs = Jobs(registry, self.limits)

    def check_serving(self) -> None:
        """ShuttingDownError once shutdown began."""
        self.registry.check_serving()

    # ----- sessions ---------------------------------------------------------------------

    async def create(
        self, session_id: str, config: ModelConfig, text: str, alphabet: str
    ) -> Session:
        """Check the config against the limits, then create and persist the session."""
        self.registry.check_serving()
        self.registry.factory.check_config_limits(config)  # the size limits first: they say more
        self.limits.check_create_memory(config, text, alphabet)
        try:
            session = await self.registry.create(session_id, config, text, alphabet)
        except UnknownCharactersError as exc:
            raise InvalidArgumentError(f"text: {exc}") from None
        _bind(session.id)
        return session

    def get(self, session_id: str) -> Session:
        """One session, also when evicted or broken."""
        self.registry.check_serving()
        return self.registry.get(session_id)

    def list(self, size: int, after: str) -> tuple[builtins.list[Session], str, int]:
        """Up to ``size`` sessions ordered by id, those after the id ``after``: (sessions, the
        id the next page starts after, "" on the last page; the number of sessions)."""
        self.registry.check_serving()
        sessions = self.registry.sessions
        later = sorted(i for i in sessions if i > after)
        chosen = later[:size]
        next_after = chosen[-1] if len(later) > size else ""
        return [sessions[i] for i in chosen], next_after, len(sessions)

    async def delete(self, session_id: str) -> None:
        """Remove the session; a running Train ends with stop reason "deleted"."""
        await self.registry.delete(session_id)

    async def append(self, chunks: AsyncIterator[tuple[str, str]]) -> tuple[Session, int]:
        """Collect every (session_id, text) chunk, then append them all at once (all or
        nothing); the session and the number of characters appended."""
        self.registry.check_serving()
        session_id = ""
        parts: builtins.list[np.ndarray] = []
        received = 0  # characters
        received_bytes = 0  # UTF-8, what the corpus limits count
        first = True
        async for chunk_id, text in chunks:
            if first:
                if not chunk_id:
                    raise InvalidArgumentError(
                        "session_id is required in the first AppendText chunk"
                    )
                session_id = chunk_id
                _bind(session_id)
                first = False
            elif chunk_id and chunk_id != session_id:
                raise InvalidArgumentError(
                    f"session_id {chunk_id!r} in a later chunk differs from the first "
                    f"chunk's {session_id!r}; a call appends to one session"
                )
            parts.append(self._encode_for_append(session_id, text, received))
            received += len(text)
            received_bytes += utf8_size(text)
            session = self.registry.get(session_id)
            self.registry.check_corpus_limits(session.summary.corpus_bytes, received_bytes)
        if first:
            raise InvalidArgumentError("AppendText received no chunks; send at least one")
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        async with self.registry.use(session_id) as session:
            if session.active_job is not None:
                async with session.between_chunks():
                    await self.registry.append(session, ids, held=True)
            else:
                await self.registry.append(session, ids)
            return session, received

    def _encode_for_append(self, session_id: str, text: str, offset: int) -> np.ndarray:
        session = self.registry.get(session_id)
        if session.broken is not None:
            session.require_trainer()
        alphabet = session.summary.alphabet
        bad = sorted(set(text) - set(alphabet))
        if bad:
            where = offset + min(text.index(ch) for ch in bad)
            raise InvalidArgumentError(
                f"text: characters {''.join(bad)!r} (first at character {where} of this call) are "
                f"not in session {session_id!r}'s alphabet; create a session with an alphabet "
                "that includes them"
            )
        lookup = {ch: i for i, ch in enumerate(alphabet)}
        return np.fromiter((lookup[ch] for ch in text), dtype=np.int32, count=len(text))

    # ----- settings, export, import, fork -------------------------------------------------

    async def update(self, session_id: str, changes: dict[str, Any]) -> Session:
        """Change mutable settings; persisted before it returns."""
        async with (
            self.registry.use(session_id) as session,
            self._exclusive(session, "UpdateSession"),
        ):
            await self.registry.run(session.reconfigure, changes)
            # Still held while it is written, so no other change can mark it dirty.
            await self.registry.checkpoints.flush(session)
            if session.checkpoint.dirty:  # the write failed: never acknowledge what is not kept
                raise CheckpointError(
                    f"session {session.id!r} was updated in memory but could not be "
                    "checkpointed; the server log has the reason"
                )
            log.info("session_updated", session_id=session.id, **changes)
            return session

    @contextlib.asynccontextmanager
    async def _exclusive(self, session: Session, kind: str) -> AsyncIterator[None]:
        """The session to this call alone: between two chunks of its job if one runs (the job
        trains on the change afterwards), else busy with ``kind`` (refused while a Train or
        Step runs: a setting changing mid-call would make its progress reports and the loss
        history describe two configurations at once)."""
        if session.active_job is not None:
            async with session.between_chunks():
                yield
            return
        session.begin(kind)
        try:
            yield
        finally:
            session.end()

    async def fork(self, session_id: str, new_id: str, changes: dict[str, Any]) -> Session:
        """Copy a session (a consistent snapshot, even while it trains) under a new id."""
        self.registry.check_serving()
        if not new_id:
            raise InvalidArgumentError("new_session_id is required: the copy's id")
        validate_session_id(new_id)
        async with self.registry.use(session_id) as session:
            ckpt = await self.registry.run(session.export_state)
        ckpt.session_id = new_id
        return await self.registry.adopt(ckpt, changes)

    async def export(self, session_id: str, weights_only: bool = False) -> bytes:
        """The session's archive, whole or weights only (storage/archive.py documents the
        format)."""
        async with self.registry.use(session_id) as session:
            ckpt = await self.registry.run(session.export_state)
        return await self.registry.run(archive.write, ckpt, weights_only)

    async def import_(self, chunks: AsyncIterator[tuple[str, bytes]]) -> Session:
        """Collect an archive from (session_id, data) chunks (bounded by max_import_bytes),
        check it, adopt it under the first chunk's id or the archive's."""
        self.registry.check_serving()
        limit = self.settings.max_import_bytes
        parts: builtins.list[bytes] = []
        received = 0
        session_id = ""
        first = True
        async for chunk_id, data in chunks:
            if first:
                session_id = chunk_id
                if session_id:
                    validate_session_id(session_id)
                    _bind(session_id)
                first = False
            elif chunk_id and chunk_id != session_id:
                raise InvalidArgumentError(
                    "session_id goes in the first ImportSession chunk only (or repeats it)"
                )
            received += len(data)
            if received > limit:
                raise limit_error("the archive size in bytes", received, limit, "max_import_bytes")
            parts.append(data)
        if received == 0:
            raise InvalidArgumentError("ImportSession received no archive bytes")
        blob = b"".join(parts)
        parts.clear()
        ckpt = await self.registry.run(archive.read, blob, self.registry.check_import)
        del blob
        if session_id:
            ckpt.session_id = session_id
        elif not ckpt.session_id:
            raise InvalidArgumentError("the archive names no session id: give one (--id)")
        return await self.registry.adopt(ckpt)

    # ----- training ---------------------------------------------------------------------

    async def step(
        self, session_id: str, text: str = "", until_step: int | None = None
    ) -> StepOutcome:
        """One update on the corpus, or on ``text``; the checkpoint is written behind. With
        ``until_step``, only while the session is below it (a retried Step is not applied
        twice)."""
        if until_step is not None and until_step < 1:
            raise InvalidArgumentError(f"until_step must be >= 1, not {until_step}")
        async with self.registry.use(session_id) as session:
            if session.checkpoint.error is not None:  # a change that can't be kept: refused
                await self.registry.checkpoints.check_writable(session)
            ids = None
            if text:
                self.limits.check_text(text, "text")
                self.limits.check_memory(
                    session,
                    f"Step on a text of {len(text)} characters (one window over all of it)",
                    budget.step_text_bytes,
                    len(text),
                )
                ids = encode(session, text, "text")
            else:
                self.limits.check_update_memory(session, "Step", 0)
            session.begin("Step")
            try:
                if until_step is not None and session.step >= until_step:
                    return self._replay(session, until_step)
                # A small model's step runs right here: the thread hop would cost more.
                try:
                    quick = session.try_step_now() if ids is None else None
                    result = (
                        quick
                        if quick is not None
                        else await self.registry.run(session.step_once, ids)
                    )
                except DivergedError:
                    metrics.record_divergence()
                    raise
                metrics.record_training(1, result.chars, session.id)
            finally:
                session.end()
                session.notify()
            # Write-behind: the reply doesn't wait; checkpointed_step says what is durable.
            self.registry.checkpoints.request(session)
        return StepOutcome(
            step=result.step,
            loss=result.loss,
            grad_norm=result.grad_norm,
            chars=result.chars,
            checkpointed_step=max(session.checkpoint.step, 0),
        )

    @staticmethod
    def _replay(session: Session, step: int) -> StepOutcome:
        """The reply a Step that reached ``step`` gave (its loss is in the history)."""
        (loss,) = session.history(step - 1, step)
        return StepOutcome(
            step=step,
            loss=float(loss),
            grad_norm=0.0,
            chars=0,
            checkpointed_step=max(session.checkpoint.step, 0),
            replayed=True,
        )

    def train(
        self, session_id: str, plan: TrainingPlan, started_by: str = ""
    ) -> AsyncGenerator[TrainProgress, None]:
        """The plan's updates as an attached job, with progress reports (training.py)."""
        return self.jobs.train(session_id, plan, started_by)

    async def watch(
        self, session_id: str, from_step: int
    ) -> AsyncGenerator[builtins.list[tuple[int, float, float | None]], None]:
        """Batches of (step, loss, validation loss or None): history from ``from_step``, then
        live points, until the session is deleted or the server shuts down."""
        if from_step < 0:
            raise InvalidArgumentError(
                f"from_step must be >= 0 (1 is the first update), not {from_step}"
            )
        async with self.registry.use(session_id) as session:
            session.use.watchers += 1
            try:
                index = max(from_step, 1) - 1
                while True:
                    changed = session.changed()
                    while index < session.step:
                        losses = session.history(index, index + WATCH_BATCH)
                        yield [
                            (index + 1 + i, float(v), session.losses.validation.get(index + 1 + i))
                            for i, v in enumerate(losses)
                        ]
                        index += len(losses)
                    stopping = session.closing or self.registry.shutting_down
                    # At shutdown a running Train still records its last updates before it
                    # stops: keep following until it ends (it notifies), then end the stream.
                    if session.deleted or (stopping and session.busy != "Train"):
                        return
                    await changed.wait()
            finally:
                session.use.watchers -= 1

    # ----- sampling ---------------------------------------------------------------------

    async def generate(self, session_id: str, o: GenerateOptions) -> AsyncGenerator[str, None]:
        """o.length characters sampled after o.prime, in growing chunks."""
        s = self.settings
        self.limits.check_count("length", o.length, 1, s.max_generate_length, "max_generate_length")
        if not math.isfinite(o.temperature) or o.temperature < 0:
            raise InvalidArgumentError(
                f"temperature must be a finite number >= 0 (0 is greedy), not {o.temperature}"
            )
        if o.top_k < 0:
            raise InvalidArgumentError(
                f"top_k must be >= 0 (0 means all characters), not {o.top_k}"
            )
        if o.seed is not None and o.seed < 0:
            raise InvalidArgumentError(f"seed must be >= 0, not {o.seed}")
        seed = o.seed if o.seed is not None else secrets.randbelow(2**63)
        if o.prime:
            self.limits.check_text(o.prime, "prime", min_chars=1)
        async with self.registry.use(session_id) as session:
            prime_chars, length = len(o.prime), o.length
            self.limits.check_memory(
                session,
                f"Generate of {length} characters after a prime of {prime_chars}",
                lambda _, model: budget.generate_bytes(prime_chars, length, model),
                fix="use a session with a smaller hidden_size or alphabet, or ",
            )
            prime = encode(session, o.prime, "prime") if o.prime else np.zeros(0, dtype=np.int32)
            trainer = session.require_trainer()
            # The sampler snapshots the weights when made: under the lock, between two
            # chunks of a job (never half an update).
            it = await self.registry.run(
                session.with_trainer,
                lambda t: t.sample(
                    prime,
                    length,
                    temperature=o.temperature,
                    top_k=o.top_k,
                    seed=seed,
                    chunk_size=GENERATE_CHUNK,
                ),
            )
            vocab = trainer.vocab
            count = 1  # sampler chunks per message
            while True:
                ids = await self.registry.run(session.next_chunk, it, count)
                if ids is None:
                    return
                yield str(vocab.decode(ids))
                count = min(2 * count, GENERATE_MAX_CHUNK // GENERATE_CHUNK)

    async def predict(self, session_id: str, text: str) -> tuple[str, float]:
        """Argmax next characters from a zero state, and the loss (nats per character)
        against wrap-around targets."""
        self.limits.check_text(text, "text")
        async with self.registry.use(session_id) as session:
            self.limits.check_memory(
                session,
                f"Predict on a text of {len(text)} characters",
                budget.predict_bytes,
                len(text),
            )
            ids = encode(session, text, "text")
            predicted, loss = await self.registry.run(
                session.with_trainer, lambda trainer: trainer.predict(ids)
            )
            return str(session.require_trainer().vocab.decode(predicted)), float(loss)
