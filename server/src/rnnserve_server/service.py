"""The RnnService servicer: protobuf <-> domain objects, and the one place errors become codes.

Handlers stay thin: validate the request, call the registry/session, build the response. Every
domain exception is mapped in ``_status_for``; anything unexpected is logged and becomes
INTERNAL, never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import functools
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
import numpy as np
import structlog
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

from rnnserve_server import metrics
from rnnserve_server.config import Settings
from rnnserve_server.errors import (
    CheckpointError,
    InvalidArgumentError,
    LimitExceededError,
    SessionBrokenError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    ShuttingDownError,
)
from rnnserve_server.logs import get_logger
from rnnserve_server.model import PRESETS, DivergedError, EngineError, ModelConfig
from rnnserve_server.registry import Registry, limit_message
from rnnserve_server.session import ChunkResult, Session, StopCause
from rnnserve_server.vocab import UnknownCharactersError, utf8_size

log = get_logger("rnnserve.service")

LN2 = math.log(2.0)
WATCH_BATCH = 1000  # most loss points in one WatchLoss message
# Generate sends its first GENERATE_CHUNK characters as soon as they exist, then doubles the
# message size up to GENERATE_MAX_CHUNK: each message costs a thread hop and GIL hand-offs
# that slowed sampling by >10 % at 512 characters a message (bench/service.py, BENCHMARKS.md).
GENERATE_CHUNK = 256
GENERATE_MAX_CHUNK = 8192
CHUNK_SECONDS = 0.05  # training time per executor call: cancel/RPC latency vs overhead
PROGRESS_LOG_SECONDS = 10.0  # training progress is logged at most this often per Train

_PRESETS = {
    pb.PRESET_UNSPECIFIED: "default",
    pb.PRESET_DEFAULT: "default",
    pb.PRESET_NOTEBOOK: "notebook",
    pb.PRESET_MIN_CHAR_RNN: "min-char-rnn",
    pb.PRESET_QUALITY: "quality",
}
_CELLS = {pb.CELL_RNN: "rnn", pb.CELL_LSTM: "lstm", pb.CELL_GRU: "gru"}
_CELL_ENUM = {v: k for k, v in _CELLS.items()}
_OPTIMIZERS = {pb.OPTIMIZER_SGD: "sgd", pb.OPTIMIZER_ADAGRAD: "adagrad", pb.OPTIMIZER_ADAM: "adam"}
_OPTIMIZER_ENUM = {v: k for k, v in _OPTIMIZERS.items()}
_DTYPES = {pb.DATA_TYPE_FLOAT32: "float32", pb.DATA_TYPE_FLOAT64: "float64"}
_DTYPE_ENUM = {v: k for k, v in _DTYPES.items()}

R = TypeVar("R")


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status code and message for a known exception; None for an unexpected one."""
    table: list[tuple[type[BaseException], grpc.StatusCode]] = [
        (SessionNotFoundError, grpc.StatusCode.NOT_FOUND),
        (SessionExistsError, grpc.StatusCode.ALREADY_EXISTS),
        (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
        (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (SessionBusyError, grpc.StatusCode.FAILED_PRECONDITION),
        (SessionBrokenError, grpc.StatusCode.FAILED_PRECONDITION),
        (ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
        (UnknownCharactersError, grpc.StatusCode.INVALID_ARGUMENT),
        (EngineError, grpc.StatusCode.INVALID_ARGUMENT),
        (CheckpointError, grpc.StatusCode.INTERNAL),
    ]
    for kind, code in table:
        if isinstance(exc, kind):
            return code, str(exc)
    if isinstance(exc, DivergedError):
        return grpc.StatusCode.ABORTED, (
            f"training diverged: {exc}; the update was not applied and the session keeps its "
            "last good weights; the learning rate is probably too high"
        )
    return None


async def _abort_for(exc: Exception, context: aio.ServicerContext[Any, Any]) -> None:
    mapped = _status_for(exc)
    if mapped is None:
        log.exception("internal_error", error=repr(exc))
        mapped = (
            grpc.StatusCode.INTERNAL,
            f"internal server error ({type(exc).__name__}); the server log has the details",
        )
    await context.abort(*mapped)


def unary(
    fn: Callable[[Servicer, Any, aio.ServicerContext[Any, Any]], Awaitable[R]],
) -> Callable[[Servicer, Any, aio.ServicerContext[Any, Any]], Awaitable[R]]:
    """Map exceptions of a unary handler to status codes."""

    @functools.wraps(fn)
    async def wrapper(self: Servicer, request: Any, context: aio.ServicerContext[Any, Any]) -> R:
        _bind(request)
        try:
            return await fn(self, request, context)
        except aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context)
            raise AssertionError("unreachable") from exc

    return wrapper


def stream(
    fn: Callable[[Servicer, Any, aio.ServicerContext[Any, Any]], AsyncIterator[R]],
) -> Callable[[Servicer, Any, aio.ServicerContext[Any, Any]], AsyncIterator[R]]:
    """Map exceptions of a server-streaming handler to status codes."""

    @functools.wraps(fn)
    async def wrapper(
        self: Servicer, request: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[R]:
        _bind(request)
        try:
            async for item in fn(self, request, context):
                yield item
        except aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context)

    return wrapper


def _bind(request: Any) -> None:
    session_id = getattr(request, "session_id", None)
    if session_id:
        structlog.contextvars.bind_contextvars(session_id=session_id[:80])


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def session_to_pb(session: Session) -> pb.Session:
    """The wire form of a session."""
    msg = pb.Session(
        session_id=session.id,
        step=session.step,
        loss=session.loss,
        smoothed_loss=session.smoothed_loss,
        create_time=_timestamp(session.create_time),
        update_time=_timestamp(session.update_time),
        resident=session.resident,
        checkpointed_step=max(session.checkpointed_step, 0),
    )
    if session.broken_error is not None:
        msg.state = pb.SESSION_STATE_BROKEN
        msg.error = session.broken_error
        return msg
    msg.state = (
        pb.SESSION_STATE_TRAINING if session.busy in ("Train", "Step") else pb.SESSION_STATE_READY
    )
    summary = session.summary
    msg.corpus_chars = summary.corpus_chars
    msg.alphabet = summary.alphabet
    msg.parameter_count = summary.parameter_count
    if summary.config is not None:
        c = summary.config
        msg.config.CopyFrom(
            pb.SessionConfig(
                hidden_size=c.hidden_size,
                seq_length=c.seq_length,
                batch_size=c.batch_size,
                learning_rate=c.learning_rate,
                optimizer=_OPTIMIZER_ENUM.get(c.optimizer, pb.OPTIMIZER_UNSPECIFIED),
                clip=c.clip,
                seed=c.seed,
                dtype=_DTYPE_ENUM.get(c.dtype, pb.DATA_TYPE_UNSPECIFIED),
                reset_every=c.reset_every,
                cell=_CELL_ENUM.get(c.cell, pb.CELL_UNSPECIFIED),
                num_layers=c.num_layers,
                dropout=c.dropout,
            )
        )
    return msg


def _config_from_request(request: pb.CreateSessionRequest) -> ModelConfig:
    """The preset with the request's overrides, validated (EngineError names the field)."""
    if request.preset not in _PRESETS:
        raise InvalidArgumentError(f"preset {request.preset} is not a known Preset value")
    base = PRESETS[_PRESETS[request.preset]]
    c = request.config
    changes: dict[str, Any] = {}
    for name in ("hidden_size", "seq_length", "batch_size", "reset_every"):
        if c.HasField(name):
            changes[name] = int(getattr(c, name))
    for name in ("learning_rate", "clip"):
        if c.HasField(name):
            value = float(getattr(c, name))
            if not math.isfinite(value) or value <= 0:
                raise InvalidArgumentError(
                    f"config.{name} must be a positive finite number, not {value}"
                )
            changes[name] = value
    if c.optimizer != pb.OPTIMIZER_UNSPECIFIED:
        if c.optimizer not in _OPTIMIZERS:
            raise InvalidArgumentError(
                f"config.optimizer {c.optimizer} is not a known Optimizer value"
            )
        changes["optimizer"] = _OPTIMIZERS[c.optimizer]
    if c.dtype != pb.DATA_TYPE_UNSPECIFIED:
        if c.dtype not in _DTYPES:
            raise InvalidArgumentError(f"config.dtype {c.dtype} is not a known DataType value")
        changes["dtype"] = _DTYPES[c.dtype]
    if c.cell != pb.CELL_UNSPECIFIED:
        if c.cell not in _CELLS:
            raise InvalidArgumentError(f"config.cell {c.cell} is not a known Cell value")
        changes["cell"] = _CELLS[c.cell]
    if c.HasField("num_layers"):
        if c.num_layers < 1:
            raise InvalidArgumentError(f"config.num_layers must be >= 1, not {c.num_layers}")
        changes["num_layers"] = int(c.num_layers)
    if c.HasField("dropout"):
        if not 0 <= c.dropout < 1:  # also refuses NaN
            raise InvalidArgumentError(f"config.dropout must be in [0, 1), not {c.dropout}")
        changes["dropout"] = float(c.dropout)
    if c.HasField("seed"):
        if c.seed < 0:
            raise InvalidArgumentError(f"config.seed must be >= 0, not {c.seed}")
        changes["seed"] = int(c.seed)
    else:
        changes["seed"] = secrets.randbelow(2**31)
    for name in ("hidden_size", "seq_length", "batch_size"):
        if name in changes and changes[name] < 1:
            raise InvalidArgumentError(f"config.{name} must be >= 1, not {changes[name]}")
    if changes.get("reset_every", 0) < 0:
        raise InvalidArgumentError(f"config.reset_every must be >= 0, not {changes['reset_every']}")
    config = base.replace(**changes)
    config.validate()
    return config


class Servicer(pb_grpc.RnnServiceServicer):
    """rnnserve.v1.RnnService over a Registry."""

    def __init__(self, settings: Settings, registry: Registry) -> None:
        self.settings = settings
        self.registry = registry

    # ----- helpers ----------------------------------------------------------------------

    def _check_text(self, text: str, field: str, min_chars: int = 2) -> None:
        if len(text) < min_chars:
            raise InvalidArgumentError(
                f"{field} must have at least {min_chars} characters, it has {len(text)}"
            )
        limit = self.settings.max_text_chars
        if len(text) > limit:
            raise LimitExceededError(
                limit_message(f"{field} length", len(text), limit, "max_text_chars")
            )

    @staticmethod
    def _check_count(field: str, value: int, minimum: int, limit: int, setting: str) -> None:
        """INVALID_ARGUMENT below ``minimum``; RESOURCE_EXHAUSTED above ``limit``, naming the
        ``setting`` that raises it."""
        if value < minimum:
            raise InvalidArgumentError(f"{field} must be >= {minimum}, not {value}")
        if value > limit:
            raise LimitExceededError(limit_message(field, value, limit, setting))

    @staticmethod
    def _encode(session: Session, text: str, field: str) -> np.ndarray:
        try:
            ids: np.ndarray = session.require_trainer().vocab.encode(text)
        except UnknownCharactersError as exc:
            raise InvalidArgumentError(f"{field}: {exc}") from None
        return ids

    # ----- sessions ---------------------------------------------------------------------

    @unary
    async def CreateSession(  # noqa: N802
        self, request: pb.CreateSessionRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.CreateSessionResponse:
        """Validate the config, then create and persist the session."""
        self.registry.check_serving()
        config = _config_from_request(request)
        try:
            session = await self.registry.create(
                request.session_id, config, request.text, request.alphabet
            )
        except UnknownCharactersError as exc:
            raise InvalidArgumentError(f"text: {exc}") from None
        structlog.contextvars.bind_contextvars(session_id=session.id)
        return pb.CreateSessionResponse(session=session_to_pb(session))

    @unary
    async def GetSession(  # noqa: N802
        self, request: pb.GetSessionRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.GetSessionResponse:
        """One session's state; works for evicted and broken sessions too."""
        self.registry.check_serving()
        return pb.GetSessionResponse(session=session_to_pb(self.registry.get(request.session_id)))

    @unary
    async def ListSessions(  # noqa: N802
        self, request: pb.ListSessionsRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ListSessionsResponse:
        """One page of sessions ordered by id."""
        self.registry.check_serving()
        sessions, token, total = self.registry.page(request.page_size, request.page_token)
        return pb.ListSessionsResponse(
            sessions=[session_to_pb(s) for s in sessions], next_page_token=token, total_size=total
        )

    @unary
    async def DeleteSession(  # noqa: N802
        self, request: pb.DeleteSessionRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.DeleteSessionResponse:
        """Remove the session; a running Train ends with stop_reason DELETED."""
        await self.registry.delete(request.session_id)
        return pb.DeleteSessionResponse()

    @unary
    async def AppendText(  # noqa: N802
        self,
        request_iterator: AsyncIterator[pb.AppendTextRequest],
        context: aio.ServicerContext[Any, Any],
    ) -> pb.AppendTextResponse:
        """Collect every chunk, then append them all at once (all or nothing)."""
        self.registry.check_serving()
        session_id = ""
        parts: list[np.ndarray] = []
        received = 0  # characters
        received_bytes = 0  # UTF-8, what the corpus limits count
        first = True
        async for chunk in request_iterator:
            if first:
                if not chunk.session_id:
                    raise InvalidArgumentError(
                        "session_id is required in the first AppendText chunk"
                    )
                session_id = chunk.session_id
                structlog.contextvars.bind_contextvars(session_id=session_id[:80])
                first = False
            elif chunk.session_id and chunk.session_id != session_id:
                raise InvalidArgumentError(
                    f"session_id {chunk.session_id!r} in a later chunk differs from the first "
                    f"chunk's {session_id!r}; a call appends to one session"
                )
            parts.append(self._encode_for_append(session_id, chunk.text, received))
            received += len(chunk.text)
            received_bytes += utf8_size(chunk.text)
            session = self.registry.get(session_id)
            self.registry.check_corpus_limits(session.summary.corpus_bytes, received_bytes)
        if first:
            raise InvalidArgumentError("AppendText received no chunks; send at least one")
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
        async with self.registry.use(session_id) as session:
            await self.registry.append(session, ids)
            return pb.AppendTextResponse(session=session_to_pb(session), appended_chars=received)

    def _encode_for_append(self, session_id: str, text: str, offset: int) -> np.ndarray:
        session = self.registry.get(session_id)
        if session.broken_error is not None:
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

    # ----- training ---------------------------------------------------------------------

    @unary
    async def Step(  # noqa: N802
        self, request: pb.StepRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.StepResponse:
        """One update on the corpus or on the request's text."""
        async with self.registry.use(request.session_id) as session:
            ids = None
            if request.text:
                self._check_text(request.text, "text")
                ids = self._encode(session, request.text, "text")
            session.begin("Step")
            try:
                # A small model's step runs right here: the thread hop would cost more.
                quick = session.try_step_now() if ids is None else None
                result = (
                    quick if quick is not None else await self.registry.run(session.step_once, ids)
                )
                metrics.record_training(1, result.chars)
            finally:
                session.end()
                session.notify()
            # Write-behind: the reply doesn't wait; checkpointed_step says what is durable.
            self.registry.request_checkpoint(session)
        return pb.StepResponse(
            step=result.step,
            loss=result.loss,
            bits_per_char=result.loss / LN2,
            grad_norm=result.grad_norm,
            chars=result.chars,
        )

    async def _train_chunk(self, session: Session, max_steps: int) -> ChunkResult:
        """One executor call of training that survives the handler being cancelled.

        On cancellation the running chunk is told to stop, awaited (so the session is
        consistent before the busy flag clears), and the cancellation re-raised.
        """
        future = asyncio.get_running_loop().run_in_executor(
            self.registry.compute, session.train_chunk, max_steps, CHUNK_SECONDS
        )
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            session.request_stop(StopCause.CANCELLED)
            await asyncio.wait([future])
            session.notify()
            raise

    @stream
    async def Train(  # noqa: N802
        self, request: pb.TrainRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.TrainResponse]:
        """Run request.steps updates in chunks off the event loop, streaming progress."""
        s = self.settings
        self._check_count("steps", request.steps, 1, s.max_train_steps, "max_train_steps")
        if request.report_every < 0:
            raise InvalidArgumentError(f"report_every must be >= 0, not {request.report_every}")
        self._check_count(
            "sample_length", request.sample_length, 0, s.max_generate_length, "max_generate_length"
        )
        steps, every = int(request.steps), int(request.report_every)
        async with self.registry.use(request.session_id) as session:
            session.begin("Train")
            start = last_report = last_log = last_ckpt = time.monotonic()
            done = chars = 0
            first_step = session.step
            bound = log.bind(session_id=session.id, steps=steps)
            bound.info("train_started", step=first_step)

            def progress(reason: int = pb.STOP_REASON_UNSPECIFIED) -> pb.TrainResponse:
                elapsed = time.monotonic() - start
                return pb.TrainResponse(
                    step=session.step,
                    steps_done=done,
                    loss=session.loss,
                    smoothed_loss=session.smoothed_loss,
                    chars_per_second=chars / elapsed if elapsed > 0 else 0.0,
                    elapsed_seconds=elapsed,
                    stop_reason=cast(Any, reason),
                    checkpointed_step=max(session.checkpointed_step, 0),
                )

            try:
                while done < steps and not session.cancel.is_set():
                    limit = steps - done
                    if every:
                        limit = min(limit, every - done % every)
                    chunk = await self._train_chunk(session, limit)
                    done += chunk.steps
                    chars += chunk.chars
                    metrics.record_training(chunk.steps, chunk.chars)
                    session.notify()
                    if chunk.error is not None:
                        bound.warning("train_diverged", step=session.step, error=str(chunk.error))
                        raise chunk.error
                    now = time.monotonic()
                    if now - last_ckpt >= s.checkpoint_interval:
                        self.registry.request_checkpoint(session)
                        last_ckpt = now
                    if now - last_log >= PROGRESS_LOG_SECONDS:
                        bound.info(
                            "train_progress",
                            step=session.step,
                            done=done,
                            loss=round(session.smoothed_loss, 4),
                        )
                        last_log = now
                    due = (done % every == 0) if every else (now - last_report >= 1.0)
                    if due and done < steps and chunk.steps:
                        message = progress()
                        if request.sample_length:
                            message.sample = await self._sample_text(session, request.sample_length)
                        last_report = now
                        yield message
                cause = session.stop_cause
                reason = pb.STOP_REASON_COMPLETED
                if done < steps:
                    reason = (
                        pb.STOP_REASON_DELETED
                        if cause is StopCause.DELETED
                        else pb.STOP_REASON_SHUTDOWN
                    )
            except (asyncio.CancelledError, GeneratorExit):
                # The client went away, maybe while a progress message was being sent.
                session.request_stop(StopCause.CANCELLED)
                raise
            finally:
                session.end()
                session.notify()  # watchers waiting for the Train to end
                if not session.deleted:
                    self.registry.request_checkpoint(session)
                elapsed = time.monotonic() - start
                bound.info(
                    "train_finished",
                    step=session.step,
                    done=done,
                    chars_per_second=round(chars / elapsed, 1) if elapsed > 0 else 0.0,
                    cause=session.stop_cause.value,
                )
            if not session.deleted:
                await self.registry.flush(session)
            final = progress(reason)
            if request.sample_length and not session.deleted:
                final.sample = await self._sample_text(session, request.sample_length)
            yield final

    async def _sample_text(self, session: Session, length: int) -> str:
        def sample(trainer: Any) -> str:
            ids = np.concatenate(list(trainer.sample(np.zeros(0, np.int32), length)))
            return str(trainer.vocab.decode(ids))

        return cast(str, await self.registry.run(session.with_trainer, sample))

    @stream
    async def WatchLoss(  # noqa: N802
        self, request: pb.WatchLossRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchLossResponse]:
        """History from from_step, then live points, until delete or shutdown."""
        if request.from_step < 0:
            raise InvalidArgumentError(
                f"from_step must be >= 0 (1 is the first update), not {request.from_step}"
            )
        async with self.registry.use(request.session_id) as session:
            session.watchers += 1
            try:
                index = max(int(request.from_step), 1) - 1
                while True:
                    changed = session.changed()
                    while index < session.step:
                        losses = session.history(index, index + WATCH_BATCH)
                        yield pb.WatchLossResponse(
                            points=[
                                pb.LossPoint(step=index + 1 + i, loss=float(v))
                                for i, v in enumerate(losses)
                            ]
                        )
                        index += len(losses)
                    stopping = session.closing or self.registry.shutting_down
                    # At shutdown a running Train still records its last updates before it
                    # stops: keep following until it ends (it notifies), then end the stream.
                    if session.deleted or (stopping and session.busy != "Train"):
                        return
                    await changed.wait()
            finally:
                session.watchers -= 1

    # ----- sampling ---------------------------------------------------------------------

    @stream
    async def Generate(  # noqa: N802
        self, request: pb.GenerateRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Sample request.length characters after the prime, in chunks."""
        s = self.settings
        self._check_count("length", request.length, 1, s.max_generate_length, "max_generate_length")
        temperature = request.temperature if request.HasField("temperature") else 1.0
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgumentError(
                f"temperature must be a finite number >= 0 (0 is greedy), not {temperature}"
            )
        if request.top_k < 0:
            raise InvalidArgumentError(
                f"top_k must be >= 0 (0 means all characters), not {request.top_k}"
            )
        if request.HasField("seed") and request.seed < 0:
            raise InvalidArgumentError(f"seed must be >= 0, not {request.seed}")
        seed = int(request.seed) if request.HasField("seed") else secrets.randbelow(2**63)
        if request.prime:
            self._check_text(request.prime, "prime", min_chars=1)
        async with self.registry.use(request.session_id) as session:
            prime = (
                self._encode(session, request.prime, "prime")
                if request.prime
                else np.zeros(0, dtype=np.int32)
            )
            trainer = session.require_trainer()
            it = trainer.sample(
                prime,
                int(request.length),
                temperature=temperature,
                top_k=int(request.top_k),
                seed=seed,
                chunk_size=GENERATE_CHUNK,
            )
            vocab = trainer.vocab
            count = 1  # sampler chunks per message
            while True:
                ids = await self.registry.run(session.next_chunk, it, count)
                if ids is None:
                    return
                yield pb.GenerateResponse(text=vocab.decode(ids))
                count = min(2 * count, GENERATE_MAX_CHUNK // GENERATE_CHUNK)

    @unary
    async def Predict(  # noqa: N802
        self, request: pb.PredictRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.PredictResponse:
        """Argmax next characters from a zero state, and the loss against wrap-around targets."""
        self._check_text(request.text, "text")
        async with self.registry.use(request.session_id) as session:
            ids = self._encode(session, request.text, "text")
            predicted, loss = await self.registry.run(
                session.with_trainer, lambda trainer: trainer.predict(ids)
            )
            text = session.require_trainer().vocab.decode(predicted)
        return pb.PredictResponse(predicted=text, loss=loss, bits_per_char=loss / LN2)
