"""The RnnService servicer: protobuf <-> domain objects, and the one place errors become codes.

Handlers stay thin: validate the request, call the registry/session, build the response. Every
domain exception is mapped to a code and a google.rpc.Status with details in ``status.py``;
anything unexpected is logged and becomes INTERNAL, never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import functools
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import numpy as np
import structlog
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

from rnnserve_server import archive, budget, metrics, status
from rnnserve_server.config import Settings
from rnnserve_server.errors import (
    CheckpointError,
    InvalidArgumentError,
    LimitExceededError,
)
from rnnserve_server.logs import get_logger
from rnnserve_server.model import (
    MAX_VALIDATION_FRACTION,
    MUTABLE_FIELDS,
    PRESETS,
    ModelConfig,
)
from rnnserve_server.registry import Registry, limit_error, page_token_after
from rnnserve_server.session import ChunkResult, Session, StopCause, TrainPlan
from rnnserve_server.store import validate_session_id
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
DEFAULT_EVAL_EVERY = 100  # validation every this many updates when neither interval is given
# The runaway guard: a loss above this many times the uniform baseline (ln V nats, what an
# untrained model scores) for a whole report window ends a Train as diverged.
RUNAWAY_FACTOR = 2.0

# Room left in a ListSessions response for its token, total and framing.
PAGE_HEADROOM_BYTES = 1024

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


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n:,} bytes"


@functools.lru_cache(maxsize=1024)
def _train_need(
    seq: int, batch: int, hidden: int, vocab: int, dtype: str, sample_length: int
) -> int:
    """budget.train_bytes for a model, memoised (a few sizes per server, asked every Step)."""
    itemsize = np.dtype(dtype).itemsize
    return budget.train_bytes(seq, batch, hidden, vocab, itemsize, sample_length)


async def _abort_for(exc: Exception, context: aio.ServicerContext[Any, Any]) -> None:
    """End the call with the status and details status.py maps ``exc`` to."""
    await status.abort(context, exc)


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
    if session.validation_step:
        msg.validation_loss = session.validation_loss
        msg.validation_step = session.validation_step
    if session.broken_error is not None:
        msg.state = pb.SESSION_STATE_BROKEN
        msg.error = session.broken_error
        return msg
    msg.state = (
        pb.SESSION_STATE_TRAINING if session.busy in ("Train", "Step") else pb.SESSION_STATE_READY
    )
    if session.checkpoint_error is not None:
        msg.state = pb.SESSION_STATE_UNSAVED
        msg.error = session.checkpoint_error
    summary = session.summary
    msg.corpus_chars = summary.corpus_chars
    msg.alphabet = summary.alphabet
    msg.parameter_count = summary.parameter_count
    msg.validation_chars = summary.validation_chars
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
                validation_fraction=c.validation_fraction,
                cell=_CELL_ENUM.get(c.cell, pb.CELL_UNSPECIFIED),
                num_layers=c.num_layers,
                dropout=c.dropout,
            )
        )
    return msg


def _loss_point(session: Session, step: int, loss: float) -> pb.LossPoint:
    """One WatchLoss point, with the validation loss measured at that step if any."""
    point = pb.LossPoint(step=step, loss=loss)
    validation = session.validation.get(step)
    if validation is not None:
        point.validation_loss = validation
    return point


# Settings that shape the weights or the data: neither UpdateSession nor ForkSession changes
# them (fork copies the weights, so it keeps them too).
_FIXED_FIELDS = ("hidden_size", "seq_length", "batch_size", "dtype", "seed", "validation_fraction")
EXPORT_CHUNK_BYTES = 1 << 20  # archive bytes per ExportSession message


def _setting_changes(config: pb.SessionConfig, names: list[str]) -> dict[str, Any]:
    """The validated values of the mutable settings ``names`` in ``config``."""
    changes: dict[str, Any] = {}
    for name in names:
        if name in ("learning_rate", "clip"):
            value = float(getattr(config, name))
            if not math.isfinite(value) or value <= 0:
                raise InvalidArgumentError(
                    f"config.{name} must be a positive finite number, not {value}"
                )
            changes[name] = value
        elif name == "reset_every":
            if config.reset_every < 0:
                raise InvalidArgumentError(
                    f"config.reset_every must be >= 0 (0 never), not {config.reset_every}"
                )
            changes[name] = int(config.reset_every)
        elif name == "optimizer":
            if config.optimizer not in _OPTIMIZERS:
                raise InvalidArgumentError(
                    f"config.optimizer {config.optimizer} is not a known Optimizer value "
                    "(SGD, ADAGRAD or ADAM)"
                )
            changes[name] = _OPTIMIZERS[config.optimizer]
    return changes


def _fixed_field_error(name: str, verb: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"config.{name} can't be changed by {verb}: the session's weights, corpus split or "
        f"feed depend on it; only {', '.join('config.' + f for f in MUTABLE_FIELDS)} can. "
        "To try another value without losing this session, fork it (rnnserve fork ID NEWID) "
        f"and change the mutable settings there, or create a new session with the {name} "
        "you want"
    )


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
    if c.HasField("validation_fraction"):
        frac = float(c.validation_fraction)
        if not math.isfinite(frac) or not 0.0 <= frac <= MAX_VALIDATION_FRACTION:
            raise InvalidArgumentError(
                f"config.validation_fraction must be a number from 0 to "
                f"{MAX_VALIDATION_FRACTION} (the share of the corpus's tail held out), not {frac}"
            )
        changes["validation_fraction"] = frac
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
            raise limit_error(f"{field} length", len(text), limit, "max_text_chars")

    @staticmethod
    def _check_count(field: str, value: int, minimum: int, limit: int, setting: str) -> None:
        """INVALID_ARGUMENT below ``minimum``; RESOURCE_EXHAUSTED above ``limit``, naming the
        ``setting`` that raises it."""
        if value < minimum:
            raise InvalidArgumentError(f"{field} must be >= {minimum}, not {value}")
        if value > limit:
            raise limit_error(field, value, limit, setting)

    def _check_memory(
        self,
        session: Session,
        what: str,
        estimate: Callable[[int, int, int, int], int],
        chars: int = 0,
        fix: str = "",
    ) -> None:
        """RESOURCE_EXHAUSTED when the call's working memory, ``estimate(chars, hidden,
        alphabet, itemsize)`` on this session's model (budget.py), is over
        --max-request-bytes. With ``chars`` the message says how many characters would fit;
        else ``fix`` says what smaller request would."""
        config = session.require_trainer().config
        hidden, vocab = budget.width(config), len(session.summary.alphabet)
        itemsize = np.dtype(config.dtype).itemsize
        limit = self.settings.max_request_bytes
        need = estimate(chars, hidden, vocab, itemsize)
        if need <= limit:
            return
        if chars:
            most = budget.most_chars(lambda c: estimate(c, hidden, vocab, itemsize), limit, chars)
            fix = (
                f"send at most {most} characters, or "
                if most >= 2
                else "use a session with a smaller hidden_size or alphabet, or "
            )
        raise LimitExceededError(
            f"{what} needs about {_mib(need)} of working memory on this session's model "
            f"(hidden {config.hidden_size}, alphabet {vocab}, {config.dtype}), over the server "
            f"limit of {_mib(limit)}; {fix}the operator can raise the limit with "
            "--max-request-bytes or RNNSERVE_MAX_REQUEST_BYTES",
            setting="max_request_bytes",
            limit=limit,
            value=need,
        )

    def _check_update_memory(self, session: Session, what: str, sample_length: int) -> None:
        """_check_memory for training updates on the corpus (Step, Train)."""
        config = session.require_trainer().config
        seq, batch = config.seq_length, config.batch_size
        need = _train_need(
            seq,
            batch,
            budget.width(config),
            len(session.summary.alphabet),
            config.dtype,
            sample_length,
        )
        if need <= self.settings.max_request_bytes:
            return  # the common case, cached: this is on Step's hot path
        self._check_memory(
            session,
            f"{what} (batch_size {batch} x seq_length {seq}"
            + (f", sample_length {sample_length})" if sample_length else ")"),
            lambda _, h, v, i: budget.train_bytes(seq, batch, h, v, i, sample_length),
            fix="use a session with a smaller batch_size, seq_length or hidden_size, or ",
        )

    def _check_create_memory(self, config: ModelConfig, text: str, alphabet: str) -> None:
        """Refuse a session that could never train under --max-request-bytes (one update of
        batch_size x seq_length on its model), rather than create one every Step refuses."""
        limit, itemsize = self.settings.max_request_bytes, np.dtype(config.dtype).itemsize

        def need(vocab: int) -> int:
            return budget.update_bytes(
                config.seq_length, config.batch_size, budget.width(config), vocab, itemsize
            )

        # The alphabet size is at most the text's length: count it only when that matters.
        if need(min(len(alphabet or text), self.settings.max_alphabet_size)) <= limit:
            return
        vocab = len(set(alphabet or text))
        if need(vocab) > limit:
            raise LimitExceededError(
                f"training this session (batch_size {config.batch_size} x seq_length "
                f"{config.seq_length}, hidden {config.hidden_size}, alphabet {vocab}, "
                f"{config.dtype}) needs about {_mib(need(vocab))} of working memory per update, "
                f"over the server limit of {_mib(limit)}; use a smaller batch_size, seq_length "
                "or hidden_size, or the operator can raise the limit with --max-request-bytes "
                "or RNNSERVE_MAX_REQUEST_BYTES",
                setting="max_request_bytes",
                limit=limit,
                value=need(vocab),
            )

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
        self.registry.check_config_limits(config)  # the size limits first: they say more
        self._check_create_memory(config, request.text, request.alphabet)
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
        items, token = self._fit_page(sessions, token)
        return pb.ListSessionsResponse(sessions=items, next_page_token=token, total_size=total)

    def _fit_page(self, sessions: list[Session], token: str) -> tuple[list[pb.Session], str]:
        """The page's sessions that fit in one response message (large alphabets and error
        strings make sessions big): AIP-158 lets a page be smaller than page_size, and the
        next page starts after the last session sent."""
        budget = self.settings.max_message_bytes - PAGE_HEADROOM_BYTES
        items: list[pb.Session] = []
        size = 0
        for session in sessions:
            msg = session_to_pb(session)
            n = msg.ByteSize() + 6  # field tag and length prefix
            if size + n > budget:
                if not items:
                    raise limit_error(
                        f"session {session.id!r} in bytes",
                        n,
                        budget,
                        "max_message_bytes",
                    )
                return items, page_token_after(items[-1].session_id)
            items.append(msg)
            size += n
        return items, token

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

    # ----- settings, export, import, fork -------------------------------------------------

    @unary
    async def UpdateSession(  # noqa: N802
        self, request: pb.UpdateSessionRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.UpdateSessionResponse:
        """AIP-134: change the masked settings; persisted before the reply."""
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgumentError(
                "update_mask is empty: name the fields to change, e.g. config.learning_rate"
            )
        names = []
        for path in paths:
            name = path.removeprefix("config.")
            if name in MUTABLE_FIELDS and path.startswith("config."):
                names.append(name)
            elif path.startswith("config.") and name in _FIXED_FIELDS:
                raise _fixed_field_error(name, "UpdateSession")
            else:
                raise InvalidArgumentError(
                    f"update_mask path {path!r} can't be changed; changeable: "
                    f"{', '.join('config.' + f for f in MUTABLE_FIELDS)} (fork the session "
                    "or create a new one for anything else)"
                )
        changes = _setting_changes(request.session.config, names)
        async with self.registry.use(request.session.session_id) as session:
            # Refused while a Train or Step runs: a setting changing mid-call would make its
            # progress reports and the loss history describe two configurations at once.
            session.begin("UpdateSession")
            try:
                await self.registry.run(session.reconfigure, changes)
                # Still busy while it is written, so no other change can mark it dirty.
                await self.registry.flush(session)
                if session.dirty:  # the write failed: never acknowledge what is not kept
                    raise CheckpointError(
                        f"session {session.id!r} was updated in memory but could not be "
                        "checkpointed; the server log has the reason"
                    )
            finally:
                session.end()
            log.info("session_updated", session_id=session.id, **changes)
            return pb.UpdateSessionResponse(session=session_to_pb(session))

    @unary
    async def ForkSession(  # noqa: N802
        self, request: pb.ForkSessionRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.ForkSessionResponse:
        """Copy a session (a consistent snapshot, even while it trains) under a new id."""
        self.registry.check_serving()
        if not request.new_session_id:
            raise InvalidArgumentError("new_session_id is required: the copy's id")
        validate_session_id(request.new_session_id)
        c = request.config
        for name in _FIXED_FIELDS:
            if name in ("dtype",) and c.dtype != pb.DATA_TYPE_UNSPECIFIED:
                raise _fixed_field_error(name, "ForkSession")
            if name != "dtype" and c.HasField(name):
                raise _fixed_field_error(name, "ForkSession")
        names = [n for n in ("learning_rate", "clip", "reset_every") if c.HasField(n)]
        if c.optimizer != pb.OPTIMIZER_UNSPECIFIED:
            names.append("optimizer")
        changes = _setting_changes(c, names)
        async with self.registry.use(request.session_id) as session:
            ckpt = await self.registry.run(session.export_state)
        ckpt.session_id = request.new_session_id
        copy = await self.registry.adopt(ckpt, changes)
        return pb.ForkSessionResponse(session=session_to_pb(copy))

    @stream
    async def ExportSession(  # noqa: N802
        self, request: pb.ExportSessionRequest, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.ExportSessionResponse]:
        """The session's archive (archive.py documents the format), in chunks."""
        async with self.registry.use(request.session_id) as session:
            ckpt = await self.registry.run(session.export_state)
        data = await self.registry.run(archive.write, ckpt)
        size = min(EXPORT_CHUNK_BYTES, max(self.settings.max_message_bytes // 2, 1024))
        for start in range(0, len(data), size):
            message = pb.ExportSessionResponse(data=data[start : start + size])
            if start == 0:
                message.total_bytes = len(data)
            yield message

    @unary
    async def ImportSession(  # noqa: N802
        self,
        request_iterator: AsyncIterator[pb.ImportSessionRequest],
        context: aio.ServicerContext[Any, Any],
    ) -> pb.ImportSessionResponse:
        """Collect the archive (bounded by max_import_bytes), check it, adopt it."""
        self.registry.check_serving()
        limit = self.settings.max_import_bytes
        parts: list[bytes] = []
        received = 0
        session_id = ""
        first = True
        async for chunk in request_iterator:
            if first:
                session_id = chunk.session_id
                if session_id:
                    validate_session_id(session_id)
                    structlog.contextvars.bind_contextvars(session_id=session_id)
                first = False
            elif chunk.session_id and chunk.session_id != session_id:
                raise InvalidArgumentError(
                    "session_id goes in the first ImportSession chunk only (or repeats it)"
                )
            received += len(chunk.data)
            if received > limit:
                raise limit_error("the archive size in bytes", received, limit, "max_import_bytes")
            parts.append(chunk.data)
        if received == 0:
            raise InvalidArgumentError("ImportSession received no archive bytes")
        data = b"".join(parts)
        parts.clear()
        ckpt = await self.registry.run(archive.read, data, self.registry.check_import)
        del data
        if session_id:
            ckpt.session_id = session_id
        elif not ckpt.session_id:
            raise InvalidArgumentError("the archive names no session id: give one (--id)")
        session = await self.registry.adopt(ckpt)
        return pb.ImportSessionResponse(session=session_to_pb(session))

    # ----- training ---------------------------------------------------------------------

    @unary
    async def Step(  # noqa: N802
        self, request: pb.StepRequest, context: aio.ServicerContext[Any, Any]
    ) -> pb.StepResponse:
        """One update on the corpus or on the request's text."""
        async with self.registry.use(request.session_id) as session:
            if session.checkpoint_error is not None:  # a change that can't be kept: refused
                await self.registry.check_writable(session)
            ids = None
            if request.text:
                self._check_text(request.text, "text")
                self._check_memory(
                    session,
                    f"Step on a text of {len(request.text)} characters (one window over all of it)",
                    budget.step_text_bytes,
                    len(request.text),
                )
                ids = self._encode(session, request.text, "text")
            else:
                self._check_update_memory(session, "Step", 0)
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
            checkpointed_step=max(session.checkpointed_step, 0),
        )

    async def _train_chunk(
        self, session: Session, max_steps: int, plan: TrainPlan | None = None
    ) -> ChunkResult:
        """One executor call of training that survives the handler being cancelled.

        On cancellation the running chunk is told to stop, awaited (so the session is
        consistent before the busy flag clears), and the cancellation re-raised.
        """
        future = asyncio.get_running_loop().run_in_executor(
            self.registry.compute, session.train_chunk, max_steps, CHUNK_SECONDS, plan
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
        if request.HasField("until_loss") and (
            not math.isfinite(request.until_loss) or request.until_loss < 0
        ):
            raise InvalidArgumentError(
                f"until_loss must be a finite number >= 0 (nats per character), not "
                f"{request.until_loss}"
            )
        if request.patience < 0:
            raise InvalidArgumentError(f"patience must be >= 0 (0 is off), not {request.patience}")
        if request.eval_every < 0:
            raise InvalidArgumentError(
                f"eval_every must be >= 0 (0 follows report_every), not {request.eval_every}"
            )
        sample_temperature = (
            request.sample_temperature if request.HasField("sample_temperature") else 1.0
        )
        if not math.isfinite(sample_temperature) or sample_temperature < 0:
            raise InvalidArgumentError(
                f"sample_temperature must be a finite number >= 0 (0 is greedy), not "
                f"{sample_temperature}"
            )
        if request.sample_prime:
            self._check_text(request.sample_prime, "sample_prime", min_chars=1)
        async with self.registry.use(request.session_id) as session:
            trainer = session.require_trainer()
            sample_prime = (
                self._encode(session, request.sample_prime, "sample_prime")
                if request.sample_prime
                else np.zeros(0, dtype=np.int32)
            )
            has_validation = trainer.validation_length >= 2
            if not has_validation and (request.patience or request.eval_every):
                field = "patience" if request.patience else "eval_every"
                raise InvalidArgumentError(
                    f"{field} needs a validation split, and session {session.id!r} has none; "
                    "create a session with validation_fraction (e.g. 0.1); an existing "
                    "session's split can't change"
                )
            vocab_size = trainer.vocab.size
            runaway = RUNAWAY_FACTOR * math.log(vocab_size) if vocab_size >= 2 else math.inf
            plan = TrainPlan(
                steps=steps,
                eval_every=(
                    int(request.eval_every or every or DEFAULT_EVAL_EVERY) if has_validation else 0
                ),
                until_loss=request.until_loss if request.HasField("until_loss") else None,
                patience=int(request.patience),
            )
            diverged = False

            async def sample() -> str:
                text = await self._sample_text(
                    session, request.sample_length, sample_prime, sample_temperature
                )
                return request.sample_prime + text

            def runaway_window() -> bool:
                """The guard: every loss since the last report above the runaway line."""
                high = plan.window_min > runaway
                plan.window_min = math.inf
                return high

            await self.registry.check_writable(session)
            self._check_update_memory(session, "Train", int(request.sample_length))
            session.begin("Train")
            start = last_report = last_log = last_ckpt = time.monotonic()
            done = chars = 0
            first_step = session.step
            bound = log.bind(session_id=session.id, steps=steps)
            bound.info("train_started", step=first_step)

            def progress(reason: int = pb.STOP_REASON_UNSPECIFIED) -> pb.TrainResponse:
                elapsed = time.monotonic() - start
                message = pb.TrainResponse(
                    step=session.step,
                    steps_done=done,
                    loss=session.loss,
                    smoothed_loss=session.smoothed_loss,
                    chars_per_second=chars / elapsed if elapsed > 0 else 0.0,
                    elapsed_seconds=elapsed,
                    stop_reason=cast(Any, reason),
                    checkpointed_step=max(session.checkpointed_step, 0),
                )
                if session.validation_step:
                    message.validation_loss = session.validation_loss
                    message.validation_step = session.validation_step
                return message

            try:
                while done < steps and not session.cancel.is_set() and plan.stop is None:
                    limit = steps - done
                    if every:
                        limit = min(limit, every - done % every)
                    chunk = await self._train_chunk(session, limit, plan)
                    done += chunk.steps
                    chars += chunk.chars
                    metrics.record_training(chunk.steps, chunk.chars)
                    session.notify()
                    if chunk.error is not None:  # not applied: ends as STOP_REASON_DIVERGED
                        bound.warning("train_diverged", step=session.step, error=str(chunk.error))
                        diverged = True
                        break
                    unsaved = self.registry.unsaved.get(session.id)
                    if unsaved is not None:  # don't train on what can't be kept
                        bound.warning("train_unsaved", step=session.step, error=str(unsaved))
                        raise type(unsaved)(str(unsaved))
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
                    if (due or done == steps) and chunk.steps and runaway_window():
                        diverged = True
                        bound.warning(
                            "train_runaway", step=session.step, loss=session.loss, limit=runaway
                        )
                        break
                    if due and done < steps and chunk.steps and plan.stop is None:
                        message = progress()
                        if request.sample_length:
                            message.sample = await sample()
                        last_report = now
                        yield message
                cause = session.stop_cause
                reason = pb.STOP_REASON_COMPLETED
                if diverged:
                    reason = pb.STOP_REASON_DIVERGED
                elif plan.stop == "target":
                    reason = pb.STOP_REASON_TARGET_LOSS
                elif plan.stop == "early":
                    reason = pb.STOP_REASON_EARLY_STOPPED
                elif done < steps:
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
                final.sample = await sample()
            yield final

    async def _sample_text(
        self,
        session: Session,
        length: int,
        prime: np.ndarray | None = None,
        temperature: float = 1.0,
    ) -> str:
        start = prime if prime is not None else np.zeros(0, np.int32)

        def sample(trainer: Any) -> str:
            ids = np.concatenate(list(trainer.sample(start, length, temperature=temperature)))
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
                                _loss_point(session, index + 1 + i, float(v))
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
            prime_chars, length = len(request.prime), int(request.length)
            self._check_memory(
                session,
                f"Generate of {length} characters after a prime of {prime_chars}",
                lambda _, h, v, i: budget.generate_bytes(prime_chars, length, h, v, i),
                fix="use a session with a smaller hidden_size or alphabet, or ",
            )
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
            self._check_memory(
                session,
                f"Predict on a text of {len(request.text)} characters",
                budget.predict_bytes,
                len(request.text),
            )
            ids = self._encode(session, request.text, "text")
            predicted, loss = await self.registry.run(
                session.with_trainer, lambda trainer: trainer.predict(ids)
            )
            text = session.require_trainer().vocab.decode(predicted)
        return pb.PredictResponse(predicted=text, loss=loss, bits_per_char=loss / LN2)
