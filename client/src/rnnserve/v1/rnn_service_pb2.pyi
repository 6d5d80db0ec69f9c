import datetime

from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Optimizer(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_UNSPECIFIED: _ClassVar[Optimizer]
    OPTIMIZER_SGD: _ClassVar[Optimizer]
    OPTIMIZER_ADAGRAD: _ClassVar[Optimizer]
    OPTIMIZER_ADAM: _ClassVar[Optimizer]

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_FLOAT64: _ClassVar[DataType]

class Preset(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRESET_UNSPECIFIED: _ClassVar[Preset]
    PRESET_DEFAULT: _ClassVar[Preset]
    PRESET_NOTEBOOK: _ClassVar[Preset]
    PRESET_MIN_CHAR_RNN: _ClassVar[Preset]
    PRESET_QUALITY: _ClassVar[Preset]

class Cell(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CELL_UNSPECIFIED: _ClassVar[Cell]
    CELL_RNN: _ClassVar[Cell]
    CELL_LSTM: _ClassVar[Cell]
    CELL_GRU: _ClassVar[Cell]

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    SESSION_STATE_READY: _ClassVar[SessionState]
    SESSION_STATE_TRAINING: _ClassVar[SessionState]
    SESSION_STATE_BROKEN: _ClassVar[SessionState]
    SESSION_STATE_UNSAVED: _ClassVar[SessionState]
    SESSION_STATE_OWNER_UNREACHABLE: _ClassVar[SessionState]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_COMPLETED: _ClassVar[StopReason]
    STOP_REASON_SHUTDOWN: _ClassVar[StopReason]
    STOP_REASON_DELETED: _ClassVar[StopReason]
    STOP_REASON_DIVERGED: _ClassVar[StopReason]
    STOP_REASON_TARGET_LOSS: _ClassVar[StopReason]
    STOP_REASON_EARLY_STOPPED: _ClassVar[StopReason]
    STOP_REASON_STOPPED: _ClassVar[StopReason]
    STOP_REASON_CALLER_LEFT: _ClassVar[StopReason]
    STOP_REASON_TIME_BUDGET: _ClassVar[StopReason]
    STOP_REASON_TIME_LIMIT: _ClassVar[StopReason]
    STOP_REASON_FAILED: _ClassVar[StopReason]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_STOPPED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]

class LearningRateDecay(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEARNING_RATE_DECAY_UNSPECIFIED: _ClassVar[LearningRateDecay]
    LEARNING_RATE_DECAY_COSINE: _ClassVar[LearningRateDecay]
    LEARNING_RATE_DECAY_LINEAR: _ClassVar[LearningRateDecay]

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_SESSION_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_SESSION_EXISTS: _ClassVar[ErrorReason]
    ERROR_REASON_SESSION_BUSY: _ClassVar[ErrorReason]
    ERROR_REASON_SESSION_BROKEN: _ClassVar[ErrorReason]
    ERROR_REASON_CHECKPOINT_DAMAGED: _ClassVar[ErrorReason]
    ERROR_REASON_TRAINING_DIVERGED: _ClassVar[ErrorReason]
    ERROR_REASON_FIELD_INVALID: _ClassVar[ErrorReason]
    ERROR_REASON_LIMIT_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_STORAGE_FULL: _ClassVar[ErrorReason]
    ERROR_REASON_STORAGE_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_SHUTTING_DOWN: _ClassVar[ErrorReason]
    ERROR_REASON_UNAUTHENTICATED: _ClassVar[ErrorReason]
    ERROR_REASON_INTERNAL: _ClassVar[ErrorReason]
    ERROR_REASON_LEASE_LOST: _ClassVar[ErrorReason]
    ERROR_REASON_OWNER_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_JOB_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_NOT_SUPPORTED: _ClassVar[ErrorReason]
    ERROR_REASON_NEWER_FORMAT: _ClassVar[ErrorReason]
OPTIMIZER_UNSPECIFIED: Optimizer
OPTIMIZER_SGD: Optimizer
OPTIMIZER_ADAGRAD: Optimizer
OPTIMIZER_ADAM: Optimizer
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_FLOAT64: DataType
PRESET_UNSPECIFIED: Preset
PRESET_DEFAULT: Preset
PRESET_NOTEBOOK: Preset
PRESET_MIN_CHAR_RNN: Preset
PRESET_QUALITY: Preset
CELL_UNSPECIFIED: Cell
CELL_RNN: Cell
CELL_LSTM: Cell
CELL_GRU: Cell
SESSION_STATE_UNSPECIFIED: SessionState
SESSION_STATE_READY: SessionState
SESSION_STATE_TRAINING: SessionState
SESSION_STATE_BROKEN: SessionState
SESSION_STATE_UNSAVED: SessionState
SESSION_STATE_OWNER_UNREACHABLE: SessionState
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_COMPLETED: StopReason
STOP_REASON_SHUTDOWN: StopReason
STOP_REASON_DELETED: StopReason
STOP_REASON_DIVERGED: StopReason
STOP_REASON_TARGET_LOSS: StopReason
STOP_REASON_EARLY_STOPPED: StopReason
STOP_REASON_STOPPED: StopReason
STOP_REASON_CALLER_LEFT: StopReason
STOP_REASON_TIME_BUDGET: StopReason
STOP_REASON_TIME_LIMIT: StopReason
STOP_REASON_FAILED: StopReason
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_STOPPED: JobState
JOB_STATE_FAILED: JobState
LEARNING_RATE_DECAY_UNSPECIFIED: LearningRateDecay
LEARNING_RATE_DECAY_COSINE: LearningRateDecay
LEARNING_RATE_DECAY_LINEAR: LearningRateDecay
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_SESSION_NOT_FOUND: ErrorReason
ERROR_REASON_SESSION_EXISTS: ErrorReason
ERROR_REASON_SESSION_BUSY: ErrorReason
ERROR_REASON_SESSION_BROKEN: ErrorReason
ERROR_REASON_CHECKPOINT_DAMAGED: ErrorReason
ERROR_REASON_TRAINING_DIVERGED: ErrorReason
ERROR_REASON_FIELD_INVALID: ErrorReason
ERROR_REASON_LIMIT_EXCEEDED: ErrorReason
ERROR_REASON_STORAGE_FULL: ErrorReason
ERROR_REASON_STORAGE_UNAVAILABLE: ErrorReason
ERROR_REASON_SHUTTING_DOWN: ErrorReason
ERROR_REASON_UNAUTHENTICATED: ErrorReason
ERROR_REASON_INTERNAL: ErrorReason
ERROR_REASON_LEASE_LOST: ErrorReason
ERROR_REASON_OWNER_UNAVAILABLE: ErrorReason
ERROR_REASON_JOB_NOT_FOUND: ErrorReason
ERROR_REASON_NOT_SUPPORTED: ErrorReason
ERROR_REASON_NEWER_FORMAT: ErrorReason

class SessionConfig(_message.Message):
    __slots__ = ("hidden_size", "seq_length", "batch_size", "learning_rate", "optimizer", "clip", "seed", "dtype", "reset_every", "cell", "num_layers", "dropout", "validation_fraction")
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LENGTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    RESET_EVERY_FIELD_NUMBER: _ClassVar[int]
    CELL_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FRACTION_FIELD_NUMBER: _ClassVar[int]
    hidden_size: int
    seq_length: int
    batch_size: int
    learning_rate: float
    optimizer: Optimizer
    clip: float
    seed: int
    dtype: DataType
    reset_every: int
    cell: Cell
    num_layers: int
    dropout: float
    validation_fraction: float
    def __init__(self, hidden_size: _Optional[int] = ..., seq_length: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., optimizer: _Optional[_Union[Optimizer, str]] = ..., clip: _Optional[float] = ..., seed: _Optional[int] = ..., dtype: _Optional[_Union[DataType, str]] = ..., reset_every: _Optional[int] = ..., cell: _Optional[_Union[Cell, str]] = ..., num_layers: _Optional[int] = ..., dropout: _Optional[float] = ..., validation_fraction: _Optional[float] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "config", "state", "step", "corpus_chars", "alphabet", "loss", "smoothed_loss", "parameter_count", "create_time", "update_time", "resident", "error", "checkpointed_step", "validation_loss", "validation_step", "validation_chars", "chars_per_second", "job")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CORPUS_CHARS_FIELD_NUMBER: _ClassVar[int]
    ALPHABET_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SMOOTHED_LOSS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTED_STEP_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_STEP_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_CHARS_FIELD_NUMBER: _ClassVar[int]
    CHARS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    config: SessionConfig
    state: SessionState
    step: int
    corpus_chars: int
    alphabet: str
    loss: float
    smoothed_loss: float
    parameter_count: int
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    resident: bool
    error: str
    checkpointed_step: int
    validation_loss: float
    validation_step: int
    validation_chars: int
    chars_per_second: float
    job: Job
    def __init__(self, session_id: _Optional[str] = ..., config: _Optional[_Union[SessionConfig, _Mapping]] = ..., state: _Optional[_Union[SessionState, str]] = ..., step: _Optional[int] = ..., corpus_chars: _Optional[int] = ..., alphabet: _Optional[str] = ..., loss: _Optional[float] = ..., smoothed_loss: _Optional[float] = ..., parameter_count: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., resident: _Optional[bool] = ..., error: _Optional[str] = ..., checkpointed_step: _Optional[int] = ..., validation_loss: _Optional[float] = ..., validation_step: _Optional[int] = ..., validation_chars: _Optional[int] = ..., chars_per_second: _Optional[float] = ..., job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("session_id", "preset", "config", "text", "alphabet")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ALPHABET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    preset: Preset
    config: SessionConfig
    text: str
    alphabet: str
    def __init__(self, session_id: _Optional[str] = ..., preset: _Optional[_Union[Preset, str]] = ..., config: _Optional[_Union[SessionConfig, _Mapping]] = ..., text: _Optional[str] = ..., alphabet: _Optional[str] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token", "total_size")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    total_size: int
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_size: _Optional[int] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AppendTextRequest(_message.Message):
    __slots__ = ("session_id", "text", "marks_last", "last")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MARKS_LAST_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    marks_last: bool
    last: bool
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., marks_last: _Optional[bool] = ..., last: _Optional[bool] = ...) -> None: ...

class AppendTextResponse(_message.Message):
    __slots__ = ("session", "appended_chars")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    APPENDED_CHARS_FIELD_NUMBER: _ClassVar[int]
    session: Session
    appended_chars: int
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., appended_chars: _Optional[int] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "text", "until_step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    UNTIL_STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    until_step: int
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., until_step: _Optional[int] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("step", "loss", "bits_per_char", "grad_norm", "chars", "checkpointed_step", "replayed")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_CHAR_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    CHARS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTED_STEP_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    bits_per_char: float
    grad_norm: float
    chars: int
    checkpointed_step: int
    replayed: bool
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., bits_per_char: _Optional[float] = ..., grad_norm: _Optional[float] = ..., chars: _Optional[int] = ..., checkpointed_step: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("session_id", "steps", "report_every", "sample_length", "until_loss", "patience", "eval_every", "sample_temperature", "sample_prime", "until_step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    REPORT_EVERY_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    UNTIL_LOSS_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_PRIME_FIELD_NUMBER: _ClassVar[int]
    UNTIL_STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    steps: int
    report_every: int
    sample_length: int
    until_loss: float
    patience: int
    eval_every: int
    sample_temperature: float
    sample_prime: str
    until_step: int
    def __init__(self, session_id: _Optional[str] = ..., steps: _Optional[int] = ..., report_every: _Optional[int] = ..., sample_length: _Optional[int] = ..., until_loss: _Optional[float] = ..., patience: _Optional[int] = ..., eval_every: _Optional[int] = ..., sample_temperature: _Optional[float] = ..., sample_prime: _Optional[str] = ..., until_step: _Optional[int] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("step", "steps_done", "loss", "smoothed_loss", "chars_per_second", "sample", "elapsed_seconds", "stop_reason", "checkpointed_step", "validation_loss", "validation_step", "job_name")
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SMOOTHED_LOSS_FIELD_NUMBER: _ClassVar[int]
    CHARS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTED_STEP_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_STEP_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    step: int
    steps_done: int
    loss: float
    smoothed_loss: float
    chars_per_second: float
    sample: str
    elapsed_seconds: float
    stop_reason: StopReason
    checkpointed_step: int
    validation_loss: float
    validation_step: int
    job_name: str
    def __init__(self, step: _Optional[int] = ..., steps_done: _Optional[int] = ..., loss: _Optional[float] = ..., smoothed_loss: _Optional[float] = ..., chars_per_second: _Optional[float] = ..., sample: _Optional[str] = ..., elapsed_seconds: _Optional[float] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ..., checkpointed_step: _Optional[int] = ..., validation_loss: _Optional[float] = ..., validation_step: _Optional[int] = ..., job_name: _Optional[str] = ...) -> None: ...

class WatchLossRequest(_message.Message):
    __slots__ = ("session_id", "from_step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    from_step: int
    def __init__(self, session_id: _Optional[str] = ..., from_step: _Optional[int] = ...) -> None: ...

class LossPoint(_message.Message):
    __slots__ = ("step", "loss", "validation_loss")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    validation_loss: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., validation_loss: _Optional[float] = ...) -> None: ...

class WatchLossResponse(_message.Message):
    __slots__ = ("points", "restored_at_step")
    POINTS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_AT_STEP_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedCompositeFieldContainer[LossPoint]
    restored_at_step: int
    def __init__(self, points: _Optional[_Iterable[_Union[LossPoint, _Mapping]]] = ..., restored_at_step: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "prime", "length", "temperature", "top_k", "seed")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PRIME_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prime: str
    length: int
    temperature: float
    top_k: int
    seed: int
    def __init__(self, session_id: _Optional[str] = ..., prime: _Optional[str] = ..., length: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("session_id", "text")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("predicted", "loss", "bits_per_char")
    PREDICTED_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    BITS_PER_CHAR_FIELD_NUMBER: _ClassVar[int]
    predicted: str
    loss: float
    bits_per_char: float
    def __init__(self, predicted: _Optional[str] = ..., loss: _Optional[float] = ..., bits_per_char: _Optional[float] = ...) -> None: ...

class UpdateSessionRequest(_message.Message):
    __slots__ = ("session", "update_mask")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    session: Session
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class UpdateSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id", "weights_only")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_ONLY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    weights_only: bool
    def __init__(self, session_id: _Optional[str] = ..., weights_only: _Optional[bool] = ...) -> None: ...

class ExportSessionResponse(_message.Message):
    __slots__ = ("data", "total_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class ImportSessionRequest(_message.Message):
    __slots__ = ("session_id", "data")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    data: bytes
    def __init__(self, session_id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ImportSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id", "new_session_id", "config")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    new_session_id: str
    config: SessionConfig
    def __init__(self, session_id: _Optional[str] = ..., new_session_id: _Optional[str] = ..., config: _Optional[_Union[SessionConfig, _Mapping]] = ...) -> None: ...

class ForkSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class LearningRateSchedule(_message.Message):
    __slots__ = ("warmup_steps", "decay", "min_learning_rate")
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    DECAY_FIELD_NUMBER: _ClassVar[int]
    MIN_LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    warmup_steps: int
    decay: LearningRateDecay
    min_learning_rate: float
    def __init__(self, warmup_steps: _Optional[int] = ..., decay: _Optional[_Union[LearningRateDecay, str]] = ..., min_learning_rate: _Optional[float] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("steps", "until_step", "until_loss", "patience", "eval_every", "report_every", "sample_length", "sample_temperature", "sample_prime", "max_seconds", "schedule", "restore_best")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_STEP_FIELD_NUMBER: _ClassVar[int]
    UNTIL_LOSS_FIELD_NUMBER: _ClassVar[int]
    PATIENCE_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    REPORT_EVERY_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_PRIME_FIELD_NUMBER: _ClassVar[int]
    MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    RESTORE_BEST_FIELD_NUMBER: _ClassVar[int]
    steps: int
    until_step: int
    until_loss: float
    patience: int
    eval_every: int
    report_every: int
    sample_length: int
    sample_temperature: float
    sample_prime: str
    max_seconds: float
    schedule: LearningRateSchedule
    restore_best: bool
    def __init__(self, steps: _Optional[int] = ..., until_step: _Optional[int] = ..., until_loss: _Optional[float] = ..., patience: _Optional[int] = ..., eval_every: _Optional[int] = ..., report_every: _Optional[int] = ..., sample_length: _Optional[int] = ..., sample_temperature: _Optional[float] = ..., sample_prime: _Optional[str] = ..., max_seconds: _Optional[float] = ..., schedule: _Optional[_Union[LearningRateSchedule, _Mapping]] = ..., restore_best: _Optional[bool] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("name", "session_id", "job_id", "spec", "state", "stop_reason", "error", "start_step", "target_step", "step", "steps_done", "loss", "smoothed_loss", "validation_loss", "best_validation_loss", "best_step", "chars_per_second", "eta_seconds", "seconds_used", "create_time", "start_time", "end_time", "started_by", "attached", "request_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    START_STEP_FIELD_NUMBER: _ClassVar[int]
    TARGET_STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_DONE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SMOOTHED_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    BEST_VALIDATION_LOSS_FIELD_NUMBER: _ClassVar[int]
    BEST_STEP_FIELD_NUMBER: _ClassVar[int]
    CHARS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_USED_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    STARTED_BY_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    session_id: str
    job_id: str
    spec: JobSpec
    state: JobState
    stop_reason: StopReason
    error: str
    start_step: int
    target_step: int
    step: int
    steps_done: int
    loss: float
    smoothed_loss: float
    validation_loss: float
    best_validation_loss: float
    best_step: int
    chars_per_second: float
    eta_seconds: float
    seconds_used: float
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    started_by: str
    attached: bool
    request_id: str
    def __init__(self, name: _Optional[str] = ..., session_id: _Optional[str] = ..., job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ..., error: _Optional[str] = ..., start_step: _Optional[int] = ..., target_step: _Optional[int] = ..., step: _Optional[int] = ..., steps_done: _Optional[int] = ..., loss: _Optional[float] = ..., smoothed_loss: _Optional[float] = ..., validation_loss: _Optional[float] = ..., best_validation_loss: _Optional[float] = ..., best_step: _Optional[int] = ..., chars_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., seconds_used: _Optional[float] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_by: _Optional[str] = ..., attached: _Optional[bool] = ..., request_id: _Optional[str] = ...) -> None: ...

class StartJobRequest(_message.Message):
    __slots__ = ("session_id", "spec", "request_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    spec: JobSpec
    request_id: str
    def __init__(self, session_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class StartJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("session_id", "page_size", "page_token")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    page_size: int
    page_token: str
    def __init__(self, session_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class StopJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class StopJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class WatchJobResponse(_message.Message):
    __slots__ = ("job", "progress", "restored_at_step")
    JOB_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESTORED_AT_STEP_FIELD_NUMBER: _ClassVar[int]
    job: Job
    progress: TrainResponse
    restored_at_step: int
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., progress: _Optional[_Union[TrainResponse, _Mapping]] = ..., restored_at_step: _Optional[int] = ...) -> None: ...
