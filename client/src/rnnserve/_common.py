"""What the sync :class:`rnnserve.Client` and the asyncio :class:`rnnserve.aio.Client` share:
channel set-up (TLS, token, retry policy) and building requests from Python arguments.
Errors are mapped once, in :mod:`rnnserve.errors`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from rnnserve.errors import InvalidArgument
from rnnserve.v1 import rnn_service_pb2 as pb

DEFAULT_ADDRESS = "localhost:50051"
ADDRESS_ENV = "RNNSERVE_ADDRESS"  # read when no address is given
# create_session sends at most this many characters inline and appends the rest in chunks.
INLINE_TEXT_CHARS = 262144
TOKEN_ENV = "RNNSERVE_TOKEN"

PRESETS: dict[str, int] = {
    "default": pb.PRESET_DEFAULT,
    "notebook": pb.PRESET_NOTEBOOK,
    "min-char-rnn": pb.PRESET_MIN_CHAR_RNN,
    "quality": pb.PRESET_QUALITY,
}
CELLS: dict[str, int] = {"rnn": pb.CELL_RNN, "lstm": pb.CELL_LSTM, "gru": pb.CELL_GRU}
OPTIMIZERS: dict[str, int] = {
    "sgd": pb.OPTIMIZER_SGD,
    "adagrad": pb.OPTIMIZER_ADAGRAD,
    "adam": pb.OPTIMIZER_ADAM,
}
DTYPES: dict[str, int] = {"float32": pb.DATA_TYPE_FLOAT32, "float64": pb.DATA_TYPE_FLOAT64}

SERVICE = "rnnserve.v1.RnnService"
# Calls that change nothing on the server, so gRPC may send them again when the server was
# unreachable (UNAVAILABLE: no connection, or the server went away before answering). gRPC
# retries only until the first response arrives, so a caller never sees two answers. Step,
# Train, Create, Delete and AppendText change the session: never retried.
RETRIED_METHODS = ("GetSession", "ListSessions", "Predict")
RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config(*, generate: bool) -> str:
    """The ``grpc.service_config`` JSON: the retry policy for the read-only calls and health
    Check, and for Generate when ``generate`` (a channel used only for seeded Generate calls,
    whose retry makes the same text)."""
    methods: list[dict[str, str]] = [{"service": SERVICE, "method": m} for m in RETRIED_METHODS]
    methods.append({"service": "grpc.health.v1.Health", "method": "Check"})
    if generate:
        methods.append({"service": SERVICE, "method": "Generate"})
    return json.dumps({"methodConfig": [{"name": methods, "retryPolicy": RETRY_POLICY}]})


def channel_options(
    options: Iterable[tuple[str, Any]], tls_server_name: str | None, *, generate: bool
) -> list[tuple[str, Any]]:
    """gRPC channel options: the caller's, the TLS name override and the retry policy (a
    caller's own ``grpc.service_config`` or ``grpc.enable_retries`` wins)."""
    result = list(options)
    if tls_server_name:
        result.append(("grpc.ssl_target_name_override", tls_server_name))
    names = {name for name, _ in result}
    if "grpc.service_config" not in names:
        result.append(("grpc.service_config", service_config(generate=generate)))
    if "grpc.enable_retries" not in names:  # on by default; a caller may turn retries off
        result.append(("grpc.enable_retries", 1))
    return result


def channel_credentials(
    ca_file: str | os.PathLike[str] | None, tls: bool
) -> grpc.ChannelCredentials | None:
    """TLS credentials trusting ``ca_file`` (or gRPC's default roots), or None for plaintext."""
    if ca_file is None and not tls:
        return None
    root = None
    if ca_file is not None:
        with open(ca_file, "rb") as f:
            root = f.read()
    return grpc.ssl_channel_credentials(root_certificates=root)


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """``authorization: Bearer <token>``; ``token`` None reads ``RNNSERVE_TOKEN``."""
    if token is None:
        token = os.environ.get(TOKEN_ENV) or None
    return (("authorization", f"Bearer {token}"),) if token else ()


def session_metadata(
    base: tuple[tuple[str, str], ...], session_id: str
) -> tuple[tuple[str, str], ...]:
    """``base`` plus the session id as ``x-session-id``, so a hashing load balancer in front
    of a cluster sends the call to the session's owner first. Only a legal header value: a bad
    id must reach the server, which says what is wrong with it."""
    if not session_id or not (session_id.isascii() and session_id.isprintable()):
        return base
    return (*base, ("x-session-id", session_id))


def health_status_name(response: Any) -> str:
    """The name of a grpc.health.v1 HealthCheckResponse's status (SERVING, NOT_SERVING, ...)."""
    try:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
    except ValueError:  # a status newer than this client's health_pb2
        return "UNKNOWN"


def enum_value(kind: str, value: str | int | None, names: dict[str, int]) -> int:
    """A proto enum value from its CLI-style name ("min-char-rnn") or the number itself."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    key = value.strip().lower().replace("_", "-")
    if key not in names:
        raise InvalidArgument(f"unknown {kind} {value!r}: choose one of {', '.join(names)}")
    return names[key]


def create_session_request(
    text: str,
    *,
    session_id: str,
    preset: str | int,
    alphabet: str,
    hyper: dict[str, Any],
    optimizer: str | int | None,
    dtype: str | int | None,
    cell: str | int | None = None,
) -> tuple[pb.CreateSessionRequest, str]:
    """The CreateSession request, and the text past INLINE_TEXT_CHARS left to append.

    ``hyper`` maps SessionConfig field names to values; None values stay unset. A long text
    fixes the alphabet up front to ``sorted(set(text))``, what the server would pick.
    """
    config = pb.SessionConfig(
        optimizer=enum_value("optimizer", optimizer, OPTIMIZERS),  # type: ignore[arg-type]
        dtype=enum_value("dtype", dtype, DTYPES),  # type: ignore[arg-type]
        cell=enum_value("cell", cell, CELLS),  # type: ignore[arg-type]
    )
    for name, value in hyper.items():
        if value is not None:
            setattr(config, name, value)
    rest = ""
    if len(text) > INLINE_TEXT_CHARS:
        text, rest = text[:INLINE_TEXT_CHARS], text[INLINE_TEXT_CHARS:]
        alphabet = alphabet or "".join(sorted(set(text) | set(rest)))
    request = pb.CreateSessionRequest(
        session_id=session_id,
        preset=enum_value("preset", preset, PRESETS),  # type: ignore[arg-type]
        config=config,
        text=text,
        alphabet=alphabet,
    )
    return request, rest


def config_changes(
    learning_rate: float | None,
    clip: float | None,
    reset_every: int | None,
    optimizer: str | int | None,
    required: bool = True,
) -> tuple[pb.SessionConfig, list[str]]:
    """A SessionConfig with the given values set, and the update_mask paths naming them."""
    config = pb.SessionConfig()
    paths = []
    for name, value in (
        ("learning_rate", learning_rate),
        ("clip", clip),
        ("reset_every", reset_every),
    ):
        if value is not None:
            setattr(config, name, value)
            paths.append(f"config.{name}")
    if optimizer is not None:
        config.optimizer = enum_value("optimizer", optimizer, OPTIMIZERS)  # type: ignore[assignment]
        paths.append("config.optimizer")
    if required and not paths:
        raise InvalidArgument("give at least one setting to change")
    return config, paths


def generate_request(
    session_id: str, length: int, prime: str, temperature: float, top_k: int, seed: int | None
) -> pb.GenerateRequest:
    """A GenerateRequest; ``seed`` None leaves it unset (the server picks one)."""
    request = pb.GenerateRequest(
        session_id=session_id, prime=prime, length=length, temperature=temperature, top_k=top_k
    )
    if seed is not None:
        request.seed = seed
    return request
