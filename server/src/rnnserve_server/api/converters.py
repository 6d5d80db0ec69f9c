"""protobuf messages <-> domain objects, in both directions; nothing here knows a session's
lifecycle. The one mapping of SessionConfig <-> ModelConfig lives here; the ranges of the
values are checked by the domain (ModelConfig.validate, the server's limits)."""

from __future__ import annotations

import contextlib
import math
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

from google.protobuf.timestamp_pb2 import Timestamp
from rnnserve.v1 import rnn_service_pb2 as pb

from rnnserve_server.api.paging import page_token_after
from rnnserve_server.engine.model_config import MUTABLE_FIELDS, PRESETS, EngineError, ModelConfig
from rnnserve_server.errors import InvalidArgumentError
from rnnserve_server.logs import get_logger
from rnnserve_server.sessions import job_record as states
from rnnserve_server.sessions.limits import limit_error
from rnnserve_server.sessions.session import Session
from rnnserve_server.usecases.session_service import (
    FIXED_FIELDS,
    GenerateOptions,
    StepOutcome,
    TrainingPlan,
    TrainProgress,
    fixed_field_error,
)
from rnnserve_server.usecases.training import JobView, job_view

log = get_logger("rnnserve.service")

LN2 = math.log(2.0)
# Room left in a ListSessions response for its token, total and framing.
PAGE_HEADROOM_BYTES = 1024
EXPORT_CHUNK_BYTES = 1 << 20  # archive bytes per ExportSession message

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
_STOP_REASONS = {
    "completed": pb.STOP_REASON_COMPLETED,
    "diverged": pb.STOP_REASON_DIVERGED,
    "target_loss": pb.STOP_REASON_TARGET_LOSS,
    "early_stopped": pb.STOP_REASON_EARLY_STOPPED,
    "deleted": pb.STOP_REASON_DELETED,
    "shutdown": pb.STOP_REASON_SHUTDOWN,
    "stopped": pb.STOP_REASON_STOPPED,
    "caller_left": pb.STOP_REASON_CALLER_LEFT,
    "time_budget": pb.STOP_REASON_TIME_BUDGET,
    "time_limit": pb.STOP_REASON_TIME_LIMIT,
    "failed": pb.STOP_REASON_FAILED,
}
_JOB_STATES = {
    states.QUEUED: pb.JOB_STATE_QUEUED,
    states.RUNNING: pb.JOB_STATE_RUNNING,
    states.SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    states.STOPPED: pb.JOB_STATE_STOPPED,
    states.FAILED: pb.JOB_STATE_FAILED,
}
_DECAYS = {
    pb.LEARNING_RATE_DECAY_UNSPECIFIED: "constant",
    pb.LEARNING_RATE_DECAY_COSINE: "cosine",
    pb.LEARNING_RATE_DECAY_LINEAR: "linear",
}
_DECAY_ENUM = {v: k for k, v in _DECAYS.items()}


@contextlib.contextmanager
def field_errors() -> Iterator[None]:
    """The domain's EngineError for a config value as INVALID_ARGUMENT naming the request
    field (``config.<name> ...``)."""
    try:
        yield
    except EngineError as exc:
        raise InvalidArgumentError(f"config.{exc}") from None


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


# ----- SessionConfig <-> ModelConfig ---------------------------------------------------------


def config_to_pb(c: ModelConfig) -> pb.SessionConfig:
    """The wire form of a model's settings."""
    return pb.SessionConfig(
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


def _enum(c: pb.SessionConfig, name: str, table: dict[Any, str], kind: str) -> str | None:
    value = getattr(c, name)
    if value == 0:  # *_UNSPECIFIED: the preset's
        return None
    if value not in table:
        raise InvalidArgumentError(f"config.{name} {value} is not a known {kind} value")
    return table[value]


def config_changes(c: pb.SessionConfig, names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The settings of ``c`` named in ``names`` that it sets, as ModelConfig fields; their
    values are checked by the domain (ModelConfig.validate / check_changes)."""
    changes: dict[str, Any] = {}
    for name in names:
        if name in ("optimizer", "dtype", "cell"):
            enums: dict[str, tuple[dict[Any, str], str]] = {
                "optimizer": (_OPTIMIZERS, "Optimizer"),
                "dtype": (_DTYPES, "DataType"),
                "cell": (_CELLS, "Cell"),
            }
            table, kind = enums[name]
            value = _enum(c, name, table, kind)
            if value is not None:
                changes[name] = value
        elif c.HasField(name):
            changes[name] = getattr(c, name)
    return changes


_CREATE_FIELDS = (
    "hidden_size",
    "seq_length",
    "batch_size",
    "reset_every",
    "learning_rate",
    "clip",
    "optimizer",
    "dtype",
    "cell",
    "num_layers",
    "dropout",
    "validation_fraction",
    "seed",
)


def config_from_create(request: pb.CreateSessionRequest) -> ModelConfig:
    """The preset with the request's overrides, validated (EngineError names the field)."""
    if request.preset not in _PRESETS:
        raise InvalidArgumentError(f"preset {request.preset} is not a known Preset value")
    changes = config_changes(request.config, _CREATE_FIELDS)
    changes.setdefault("seed", secrets.randbelow(2**31))
    if changes.get("num_layers") == 1:
        # Dropout applies between layers: a request for one layer drops the preset's (a
        # dropout it sets itself is still refused).
        changes.setdefault("dropout", 0.0)
    config = PRESETS[_PRESETS[request.preset]].replace(**changes)
    with field_errors():
        config.validate()
    return config


def update_changes(request: pb.UpdateSessionRequest) -> dict[str, Any]:
    """The validated changes an UpdateSession's mask and config ask for."""
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
        elif path.startswith("config.") and name in FIXED_FIELDS:
            raise fixed_field_error(name, "UpdateSession")
        else:
            raise InvalidArgumentError(
                f"update_mask path {path!r} can't be changed; changeable: "
                f"{', '.join('config.' + f for f in MUTABLE_FIELDS)} (fork the session "
                "or create a new one for anything else)"
            )
    c = request.session.config
    changes = config_changes(c, names)
    if "optimizer" in names and "optimizer" not in changes:
        raise InvalidArgumentError(
            f"config.optimizer {c.optimizer} is not a known Optimizer value (SGD, ADAGRAD or ADAM)"
        )
    for name in names:  # a masked field left unset means its zero value
        if name not in changes:
            changes[name] = getattr(c, name)
    with field_errors():
        ModelConfig.check_changes(changes)
    return changes


def fork_changes(c: pb.SessionConfig) -> dict[str, Any]:
    """The settings a ForkSession's config changes on the copy (only mutable ones)."""
    for name in FIXED_FIELDS:
        if name == "dtype" and c.dtype != pb.DATA_TYPE_UNSPECIFIED:
            raise fixed_field_error(name, "ForkSession")
        if name != "dtype" and c.HasField(name):
            raise fixed_field_error(name, "ForkSession")
    changes = config_changes(c, MUTABLE_FIELDS)
    with field_errors():
        ModelConfig.check_changes(changes)
    return changes


# ----- sessions ------------------------------------------------------------------------------


def session_to_pb(session: Session) -> pb.Session:
    """The wire form of a session; a session whose state can't be put in a message (a string
    UTF-8 can't encode, a number out of its field's range) is described as BROKEN, with the
    reason, so it never takes a ListSessions page or a GetSession down."""
    try:
        return _session_message(session)
    except (ValueError, TypeError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
        log.error("session_unsendable", session_id=session.id, error=repr(exc))
        return pb.Session(
            session_id=session.id,
            state=pb.SESSION_STATE_BROKEN,
            error=f"its state can't be put in a reply ({type(exc).__name__}; the server log "
            "has the details); delete the session",
        )


def _session_message(session: Session) -> pb.Session:
    msg = pb.Session(
        session_id=session.id,
        step=session.step,
        loss=session.losses.loss,
        smoothed_loss=session.losses.smoothed_loss,
        create_time=_timestamp(session.create_time),
        update_time=_timestamp(session.update_time),
        resident=session.resident,
        checkpointed_step=max(session.checkpoint.step, 0),
    )
    if session.losses.validation_step:
        msg.validation_loss = session.losses.validation_loss
        msg.validation_step = session.losses.validation_step
    if session.chars_per_second is not None:
        msg.chars_per_second = session.chars_per_second
    if session.broken is not None:
        msg.state = pb.SESSION_STATE_BROKEN
        msg.error = session.broken.reason
        return msg
    job = session.active_job
    training = session.busy in ("Train", "Step") or job is not None
    msg.state = pb.SESSION_STATE_TRAINING if training else pb.SESSION_STATE_READY
    if job is not None:
        msg.job.CopyFrom(job_to_pb(job_view(session, job)))
    if session.checkpoint.error is not None:
        msg.state = pb.SESSION_STATE_UNSAVED
        msg.error = session.checkpoint.error
    summary = session.summary
    msg.corpus_chars = summary.corpus_chars
    msg.alphabet = summary.alphabet
    msg.parameter_count = summary.parameter_count
    msg.validation_chars = summary.validation_chars
    if summary.config is not None:
        msg.config.CopyFrom(config_to_pb(summary.config))
    return msg


def fit_page(
    sessions: list[Session], token: str, max_message_bytes: int
) -> tuple[list[pb.Session], str]:
    """The page's sessions that fit in one response message (large alphabets and error
    strings make sessions big): AIP-158 lets a page be smaller than page_size, and the
    next page starts after the last session sent."""
    budget = max_message_bytes - PAGE_HEADROOM_BYTES
    items: list[pb.Session] = []
    size = 0
    for session in sessions:
        msg = session_to_pb(session)
        n = msg.ByteSize() + 6  # field tag and length prefix
        if size + n > budget:
            if not items:
                raise limit_error(
                    f"session {session.id!r} in bytes", n, budget, "max_message_bytes"
                )
            return items, page_token_after(items[-1].session_id)
        items.append(msg)
        size += n
    return items, token


def export_messages(data: bytes, max_message_bytes: int) -> list[pb.ExportSessionResponse]:
    """An archive in ExportSession messages; the first says the total size."""
    size = min(EXPORT_CHUNK_BYTES, max(max_message_bytes // 2, 1024))
    messages = []
    for start in range(0, len(data), size):
        message = pb.ExportSessionResponse(data=data[start : start + size])
        if start == 0:
            message.total_bytes = len(data)
        messages.append(message)
    return messages


# ----- training, watching, sampling ----------------------------------------------------------


def training_plan(r: pb.TrainRequest) -> TrainingPlan:
    """A TrainRequest's plan (the use case checks it)."""
    return TrainingPlan(
        steps=int(r.steps),
        report_every=int(r.report_every),
        sample_length=int(r.sample_length),
        sample_temperature=r.sample_temperature if r.HasField("sample_temperature") else 1.0,
        sample_prime=r.sample_prime,
        until_loss=r.until_loss if r.HasField("until_loss") else None,
        patience=int(r.patience),
        eval_every=int(r.eval_every),
        until_step=int(r.until_step) if r.HasField("until_step") else None,
    )


def progress_to_pb(p: TrainProgress) -> pb.TrainResponse:
    """One Train message."""
    message = pb.TrainResponse(
        step=p.step,
        steps_done=p.steps_done,
        loss=p.loss,
        smoothed_loss=p.smoothed_loss,
        chars_per_second=p.chars_per_second,
        elapsed_seconds=p.elapsed_seconds,
        stop_reason=cast(Any, _STOP_REASONS.get(p.stop_reason or "", 0)),
        checkpointed_step=p.checkpointed_step,
        job_name=p.job_name,
    )
    if p.validation_step:
        message.validation_loss = p.validation_loss
        message.validation_step = p.validation_step
    if p.sample is not None:
        message.sample = p.sample
    return message


def job_plan(spec: pb.JobSpec) -> TrainingPlan:
    """A JobSpec's plan (the use case checks it)."""
    schedule = spec.schedule
    decay = _DECAYS.get(schedule.decay)
    if decay is None:
        raise InvalidArgumentError(
            f"spec.schedule.decay {schedule.decay} is not a LearningRateDecay",
            field="spec.schedule.decay",
        )
    return TrainingPlan(
        steps=int(spec.steps),
        until_step=int(spec.until_step) if spec.HasField("until_step") else None,
        until_loss=spec.until_loss if spec.HasField("until_loss") else None,
        patience=int(spec.patience),
        eval_every=int(spec.eval_every),
        report_every=int(spec.report_every),
        sample_length=int(spec.sample_length),
        sample_temperature=(
            spec.sample_temperature if spec.HasField("sample_temperature") else 1.0
        ),
        sample_prime=spec.sample_prime,
        max_seconds=spec.max_seconds,
        warmup_steps=int(schedule.warmup_steps),
        decay=decay,
        min_learning_rate=(
            schedule.min_learning_rate if schedule.HasField("min_learning_rate") else None
        ),
        restore_best=spec.restore_best,
    )


def plan_to_spec(plan: TrainingPlan) -> pb.JobSpec:
    """A plan as the JobSpec that asked for it."""
    spec = pb.JobSpec(
        steps=plan.steps,
        patience=plan.patience,
        eval_every=plan.eval_every,
        report_every=plan.report_every,
        sample_length=plan.sample_length,
        sample_prime=plan.sample_prime,
        max_seconds=plan.max_seconds,
        restore_best=plan.restore_best,
    )
    if plan.until_step is not None:
        spec.until_step = plan.until_step
    if plan.until_loss is not None:
        spec.until_loss = plan.until_loss
    if plan.sample_temperature != 1.0:
        spec.sample_temperature = plan.sample_temperature
    if plan.warmup_steps or plan.decay != "constant" or plan.min_learning_rate is not None:
        spec.schedule.warmup_steps = plan.warmup_steps
        spec.schedule.decay = cast(Any, _DECAY_ENUM.get(plan.decay, 0))
        if plan.min_learning_rate is not None:
            spec.schedule.min_learning_rate = plan.min_learning_rate
    return spec


def job_to_pb(view: JobView) -> pb.Job:
    """The wire form of a job."""
    r = view.record
    job = pb.Job(
        name=view.name,
        session_id=view.session_id,
        job_id=r.job_id,
        spec=plan_to_spec(view.plan),
        state=cast(Any, _JOB_STATES[r.state]),
        stop_reason=cast(Any, _STOP_REASONS.get(r.stop_reason, 0)),
        error=r.error,
        start_step=r.start_step,
        target_step=r.target_step,
        step=view.step,
        steps_done=view.steps_done,
        loss=view.loss,
        smoothed_loss=view.smoothed_loss,
        best_step=r.best_step,
        chars_per_second=r.chars_per_second,
        seconds_used=r.seconds_used,
        create_time=_timestamp(r.create_time),
        started_by=r.started_by,
        attached=r.attached,
        request_id=r.request_id,
    )
    if r.validation_loss is not None:
        job.validation_loss = r.validation_loss
    if r.best_validation_loss is not None:
        job.best_validation_loss = r.best_validation_loss
    if view.eta_seconds is not None:
        job.eta_seconds = view.eta_seconds
    if r.start_time:
        job.start_time.CopyFrom(_timestamp(r.start_time))
    if r.end_time:
        job.end_time.CopyFrom(_timestamp(r.end_time))
    return job


def loss_points(points: list[tuple[int, float, float | None]]) -> pb.WatchLossResponse:
    """One WatchLoss message: (step, loss, validation loss at that step or None)."""
    out = []
    for step, loss, validation in points:
        point = pb.LossPoint(step=step, loss=loss)
        if validation is not None:
            point.validation_loss = validation
        out.append(point)
    return pb.WatchLossResponse(points=out)


def generate_options(r: pb.GenerateRequest) -> GenerateOptions:
    """A GenerateRequest's fields (the service checks their ranges)."""
    return GenerateOptions(
        length=int(r.length),
        prime=r.prime,
        temperature=r.temperature if r.HasField("temperature") else 1.0,
        top_k=int(r.top_k),
        seed=int(r.seed) if r.HasField("seed") else None,
    )


def step_to_pb(result: StepOutcome) -> pb.StepResponse:
    """A Step's reply."""
    return pb.StepResponse(
        step=result.step,
        loss=result.loss,
        bits_per_char=result.loss / LN2,
        grad_norm=result.grad_norm,
        chars=result.chars,
        checkpointed_step=result.checkpointed_step,
        replayed=result.replayed,
    )


async def append_chunks(
    requests: AsyncIterator[pb.AppendTextRequest],
) -> AsyncIterator[tuple[str, str]]:
    """AppendText's (session_id, text) chunks. A stream whose first chunk set marks_last must
    end with the chunk marked last, or nothing is appended: a cancel can reach the server as
    an ordinary end of the stream (see AppendTextRequest.marks_last)."""
    promised = ended = False
    first = True
    async for request in requests:
        if ended:
            raise InvalidArgumentError("a chunk came after the one marked last; send it before")
        if first:
            promised, first = request.marks_last, False
        ended = request.last
        yield request.session_id, request.text
    if promised and not ended:
        raise InvalidArgumentError(
            "the upload ended before its chunk marked last (the client gave up mid-upload); "
            "nothing was appended: send the whole text again"
        )
