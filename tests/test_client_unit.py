"""Pure tests of the client library and CLI plumbing: no server needed."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from rnnserve import (
    ConnectionLost,
    InvalidArgument,
    LimitExceeded,
    RnnServeError,
    ServerUnavailable,
    SessionBroken,
    SessionBusy,
    SessionExists,
    SessionNotFound,
    Timeout,
    TrainingDiverged,
    Unauthenticated,
)
from rnnserve._common import channel_options, health_status_name, service_config
from rnnserve._retry import Retries, cut_off, worth_retrying
from rnnserve.cli import build_parser, message_to_dict
from rnnserve.client import Client, iter_text_chunks
from rnnserve.errors import error_from_code, error_from_rpc
from rnnserve.v1 import rnn_service_pb2 as pb

pytestmark = pytest.mark.timeout(30)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.NOT_FOUND, SessionNotFound),
        (grpc.StatusCode.ALREADY_EXISTS, SessionExists),
        (grpc.StatusCode.FAILED_PRECONDITION, SessionBusy),
        (grpc.StatusCode.DATA_LOSS, SessionBroken),
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, LimitExceeded),
        (grpc.StatusCode.ABORTED, TrainingDiverged),
        (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
        (grpc.StatusCode.UNAVAILABLE, ServerUnavailable),
        (grpc.StatusCode.DEADLINE_EXCEEDED, Timeout),
        (grpc.StatusCode.INTERNAL, RnnServeError),
        (grpc.StatusCode.UNKNOWN, RnnServeError),
    ],
)
def test_status_codes_map_to_typed_errors(code: grpc.StatusCode, cls: type[RnnServeError]) -> None:
    error = error_from_rpc(FakeRpcError(code, "what to fix"))
    assert type(error) is cls
    assert error.code is code
    assert error.details == "what to fix"
    assert str(error) == "what to fix"


def test_error_bases_let_callers_catch_builtin_kinds() -> None:
    assert isinstance(error_from_code(grpc.StatusCode.DEADLINE_EXCEEDED, "x"), TimeoutError)
    assert isinstance(error_from_code(grpc.StatusCode.INVALID_ARGUMENT, "x"), ValueError)
    assert isinstance(error_from_code(grpc.StatusCode.UNAVAILABLE, "x"), ConnectionError)
    # No details from the server: the code's name stands in.
    assert error_from_code(grpc.StatusCode.ABORTED, None).details == "ABORTED"


@pytest.mark.parametrize(
    ("status", "name"), [(0, "UNKNOWN"), (1, "SERVING"), (2, "NOT_SERVING"), (3, "SERVICE_UNKNOWN")]
)
def test_health_status_names(status: int, name: str) -> None:
    assert health_status_name(health_pb2.HealthCheckResponse(status=status)) == name
    # A status this client's grpc_health does not know yet is UNKNOWN, not a crash.
    assert health_status_name(health_pb2.HealthCheckResponse(status=99)) == "UNKNOWN"


def test_retry_policy_covers_only_calls_that_change_nothing() -> None:
    config = json.loads(service_config(generate=False))
    (method_config,) = config["methodConfig"]
    names = {(n["service"], n["method"]) for n in method_config["name"]}
    assert names == {
        ("rnnserve.v1.RnnService", "GetSession"),
        ("rnnserve.v1.RnnService", "ListSessions"),
        ("rnnserve.v1.RnnService", "Predict"),
        ("grpc.health.v1.Health", "Check"),
    }
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    seeded = json.loads(service_config(generate=True))["methodConfig"][0]["name"]
    assert {"service": "rnnserve.v1.RnnService", "method": "Generate"} in seeded
    # A caller's own choices win.
    options = dict(channel_options([("grpc.enable_retries", 0)], None, generate=False))
    assert options["grpc.enable_retries"] == 0 and "grpc.service_config" in options
    mine = dict(channel_options([("grpc.service_config", "{}")], "name", generate=True))
    assert mine["grpc.service_config"] == "{}"
    assert mine["grpc.ssl_target_name_override"] == "name"


def test_chunks_of_a_string_are_bounded_and_complete() -> None:
    text = "abcdefghij" * 1001
    chunks = list(iter_text_chunks(text, 1000))
    assert all(1 <= len(c) <= 1000 for c in chunks)
    assert "".join(chunks) == text
    assert len(chunks) == 11


def test_chunks_of_files_are_read_incrementally() -> None:
    text = "Hallo, Welt! ünïcödé 🙂\n" * 500
    reads: list[int] = []

    class Spy(io.StringIO):
        def read(self, size: int | None = -1) -> str:
            reads.append(-1 if size is None else size)
            return super().read(size)

    assert "".join(iter_text_chunks(Spy(text), 100)) == text
    assert set(reads) == {100}  # never a whole-file read
    # Binary files: multi-byte characters split across reads are decoded whole.
    chunks = list(iter_text_chunks(io.BytesIO(text.encode()), 7))
    assert "".join(chunks) == text
    assert all(len(c) <= 7 for c in chunks)


def test_chunks_of_an_iterable_are_resplit_and_empties_dropped() -> None:
    def parts() -> Iterator[str]:
        yield "x" * 25
        yield ""
        yield "y"

    assert list(iter_text_chunks(parts(), 10)) == ["x" * 10, "x" * 10, "x" * 5, "y"]
    # Bytes chunks that cut a character in half.
    data = "ü".encode()
    assert list(iter_text_chunks([data[:1], data[1:]], 10)) == ["ü"]
    with pytest.raises(TypeError):
        list(iter_text_chunks([1, 2], 10))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        list(iter_text_chunks("abc", 0))


def test_bad_enum_names_are_refused_before_any_call() -> None:
    with Client("127.0.0.1:1") as client, pytest.raises(InvalidArgument, match="optimizer"):
        client.create_session("Hallo", optimizer="rmsprop")


def test_token_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RNNSERVE_TOKEN", "s3cret")
    with Client("127.0.0.1:1") as client:
        assert client._metadata == (("authorization", "Bearer s3cret"),)
    with Client("127.0.0.1:1", token="") as client:
        assert client._metadata == ()


def test_cli_json_uses_field_names_and_int64_numbers() -> None:
    data = message_to_dict(pb.TrainResponse(step=12, loss=0.5))
    assert data["step"] == 12
    assert data["steps_done"] == 0  # zero values are printed
    assert data["stop_reason"] == "STOP_REASON_UNSPECIFIED"


def test_cli_global_options_work_before_and_after_the_command() -> None:
    parser = build_parser()
    args = parser.parse_args(["--address", "a:1", "--json", "show", "x"])
    assert (args.address, args.json, args.timeout) == ("a:1", True, 30.0)
    args = parser.parse_args(["show", "x", "--address", "b:2", "--timeout", "5"])
    assert (args.address, args.json, args.timeout) == ("b:2", False, 5.0)
    args = parser.parse_args(["--address", "a:1", "show", "x"])
    assert args.address == "a:1"  # not reset by the subcommand's copy of the option


@pytest.mark.parametrize(
    ("code", "reason", "retried"),
    [
        (grpc.StatusCode.UNAVAILABLE, None, True),  # connection refused or reset
        (grpc.StatusCode.INTERNAL, None, True),  # a proxy's RST_STREAM
        (grpc.StatusCode.UNKNOWN, None, True),
        (grpc.StatusCode.DEADLINE_EXCEEDED, None, True),  # a hop's deadline
        (grpc.StatusCode.UNAVAILABLE, "OWNER_UNAVAILABLE", True),
        (grpc.StatusCode.ABORTED, "LEASE_LOST", True),
        (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", True),
        (grpc.StatusCode.INTERNAL, "INTERNAL", False),  # a server fault: it would repeat
        (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND", False),
        (grpc.StatusCode.INVALID_ARGUMENT, "FIELD_INVALID", False),
        (grpc.StatusCode.FAILED_PRECONDITION, "TRAINING_DIVERGED", False),
        (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_BUSY", False),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED", False),
        (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", False),
    ],
)
def test_idempotent_calls_are_retried_by_code_and_reason_never_text(
    code: grpc.StatusCode, reason: str | None, retried: bool
) -> None:
    error = error_from_code(code, "any text at all", reason=reason)
    assert worth_retrying(error) is retried
    retries = Retries(60.0)
    if retried:
        assert retries.delay(error) == 0.1 and retries.delay(error) == 0.2  # backoff
    else:
        with pytest.raises(RnnServeError) as raised:
            retries.delay(error)
        assert raised.value is error


def test_a_train_cut_off_without_until_step_names_the_step_to_retry_toward() -> None:
    request = pb.TrainRequest(session_id="s", steps=100)
    last = pb.TrainResponse(step=57, steps_done=7)  # started at step 50
    reset = error_from_code(grpc.StatusCode.INTERNAL, "Stream removed (RST_STREAM)")
    lost = cut_off(reset, request, last)
    assert isinstance(lost, ConnectionLost) and lost.target_step == 150
    assert lost.code is grpc.StatusCode.INTERNAL and lost.cause is reset
    assert isinstance(cut_off(None, request, last), ConnectionLost)  # ended without a final
    refused = error_from_code(grpc.StatusCode.FAILED_PRECONDITION, "busy", reason="SESSION_BUSY")
    assert cut_off(refused, request, None) is refused  # the server's answer: kept
    unreachable = error_from_code(grpc.StatusCode.UNAVAILABLE, "failed to connect")
    assert cut_off(unreachable, request, None) is unreachable  # no answer yet: maybe not sent
    until = pb.TrainRequest(session_id="s", until_step=80)
    assert getattr(cut_off(reset, until, None), "target_step", None) == 80
