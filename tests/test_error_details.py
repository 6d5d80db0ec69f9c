"""Errors as data (AIP-193): every failed call carries a google.rpc.Status with an ErrorInfo
(reason, domain rnnserve.v1, metadata) and BadRequest / QuotaFailure / RetryInfo where they
apply, decoded here with grpcio-status from a plain stub on a real server, and by the client."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from rnnserve import (
    InvalidArgument,
    JobNotFound,
    LimitExceeded,
    RnnServeError,
    ServerUnavailable,
    SessionBroken,
    SessionBusy,
    SessionNotFound,
    TrainingDiverged,
)
from rnnserve.errors import STATUS_DETAILS_KEY, error_from_rpc
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc
from rnnserve_server.api import status
from rnnserve_server.engine.model_config import DivergedError
from rnnserve_server.errors import (
    InvalidArgumentError,
    JobNotFoundError,
    LeaseLostError,
    LimitExceededError,
    NewerFormatError,
    NotSupportedError,
    OwnerUnavailableError,
    SessionBrokenError,
    SessionBusyError,
    SessionExistsError,
    SessionNotFoundError,
    ShuttingDownError,
    StorageError,
    StorageFullError,
    UnauthenticatedError,
)

if TYPE_CHECKING:
    from tests.conftest import ServerFactory, ServerHandle

pytestmark = pytest.mark.timeout(90)

TEXT = "The quick brown fox jumps over the lazy dog. " * 20
SMALL: dict[str, Any] = {"hidden_size": 8, "seq_length": 8, "batch_size": 2, "seed": 1}


class Details:
    """The decoded google.rpc.Status of a failed call: its code, ErrorInfo and other details."""

    def __init__(self, error: grpc.RpcError) -> None:
        call: Any = error
        found = rpc_status.from_call(call)
        assert found is not None, f"no {STATUS_DETAILS_KEY} trailer on {error!r}"
        self.status: status_pb2.Status = found
        self.code: grpc.StatusCode = call.code()
        self.details: str = call.details()
        self.info = self._one(error_details_pb2.ErrorInfo)
        assert self.info is not None, "no ErrorInfo"
        assert self.info.domain == "rnnserve.v1"
        assert self.status.message == self.details and self.status.code == self.code.value[0]

    def _one(self, kind: Any) -> Any:
        for detail in self.status.details:
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                return message
        return None

    @property
    def reason(self) -> str:
        return str(self.info.reason)

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.info.metadata)


def _fail(call: Any, request: Any, **kwargs: Any) -> Details:
    with pytest.raises(grpc.RpcError) as raised:
        result = call(request, timeout=30, **kwargs)
        if not isinstance(result, Message):
            for _ in result:  # a server stream: the error comes while reading it
                pass
    return Details(raised.value)


def _stub(server: ServerHandle) -> tuple[grpc.Channel, pb_grpc.RnnServiceStub]:
    channel = grpc.insecure_channel(server.address)
    return channel, pb_grpc.RnnServiceStub(channel)


def test_not_found_exists_invalid_busy_and_diverged_through_a_plain_stub(
    server: ServerHandle,
) -> None:
    channel, stub = _stub(server)
    with channel, server.client() as client:
        d = _fail(stub.GetSession, pb.GetSessionRequest(session_id="no-such-session"))
        assert (d.code, d.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND")
        assert d.metadata["session_id"] == "no-such-session"

        client.create_session(TEXT, session_id="taken", **SMALL)
        d = _fail(stub.CreateSession, pb.CreateSessionRequest(session_id="taken", text=TEXT))
        assert (d.code, d.reason) == (grpc.StatusCode.ALREADY_EXISTS, "SESSION_EXISTS")
        assert d.metadata["session_id"] == "taken"

        bad = pb.CreateSessionRequest(text=TEXT, config=pb.SessionConfig(hidden_size=0))
        d = _fail(stub.CreateSession, bad)
        assert (d.code, d.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "FIELD_INVALID")
        bad_request = d._one(error_details_pb2.BadRequest)
        assert [v.field for v in bad_request.field_violations] == ["config.hidden_size"]
        assert d.metadata["field"] == "config.hidden_size"

        d = _fail(
            stub.Generate,
            pb.GenerateRequest(session_id="taken", length=5, temperature=-1.0),
        )
        assert d.reason == "FIELD_INVALID" and d.metadata["field"] == "temperature"

        d = _fail(stub.GetSession, pb.GetSessionRequest(session_id="../etc"))
        assert d.reason == "FIELD_INVALID" and d.metadata["field"] == "session_id"

        # Busy: a Train holds the session; a Step is refused until it ends.
        train = client.session("taken").train(1_000_000, report_every=1)
        next(train)
        try:
            d = _fail(stub.Step, pb.StepRequest(session_id="taken"))
            assert (d.code, d.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_BUSY")
            assert d.metadata["session_id"] == "taken"
            assert d._one(error_details_pb2.RetryInfo) is None
        finally:
            train.cancel()

        client.create_session(
            TEXT, session_id="wild", preset="notebook", learning_rate=1e38, seed=1
        ).step()
        d = _fail(stub.Step, pb.StepRequest(session_id="wild"))
        assert (d.code, d.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "TRAINING_DIVERGED")
        assert d.metadata["session_id"] == "wild"


def test_limits_carry_quota_failure_and_the_setting(server_factory: ServerFactory) -> None:
    server = server_factory(max_sessions=1, max_message_bytes=65536)
    channel, stub = _stub(server)
    with channel:
        stub.CreateSession(pb.CreateSessionRequest(session_id="one", text=TEXT), timeout=30)
        d = _fail(stub.CreateSession, pb.CreateSessionRequest(session_id="two", text=TEXT))
        assert (d.code, d.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED")
        assert d.metadata["limit"] == "max_sessions"
        assert (d.metadata["limit_value"], d.metadata["value"]) == ("1", "2")
        quota = d._one(error_details_pb2.QuotaFailure)
        assert quota.violations[0].quota_id == "max_sessions"
        assert quota.violations[0].quota_value == 1
        assert "--max-sessions" in quota.violations[0].description

        # Refused by the request guard before any handler runs: details all the same.
        big = pb.AppendTextRequest(session_id="one", text="a" * 70_000)
        with pytest.raises(grpc.RpcError) as raised:
            stub.AppendText(iter([big]), timeout=30)
        d = Details(raised.value)
        assert d.reason == "LIMIT_EXCEEDED" and d.metadata["limit"] == "max_message_bytes"


def test_unauthenticated_has_a_reason(server_factory: ServerFactory) -> None:
    server = server_factory(auth_token=["s3cret-token-value"])
    channel, stub = _stub(server)
    with channel:
        d = _fail(stub.ListSessions, pb.ListSessionsRequest())
        assert (d.code, d.reason) == (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")


def test_shutting_down_is_unavailable_with_retry_info(server: ServerHandle) -> None:
    """An AppendText still streaming when SIGTERM arrives is refused: SHUTTING_DOWN, with the
    RetryInfo a client uses to wait before trying again (elsewhere)."""
    channel, stub = _stub(server)
    with channel:
        stub.CreateSession(pb.CreateSessionRequest(session_id="s", text=TEXT), timeout=30)
        first_sent, go_on = threading.Event(), threading.Event()

        def chunks() -> Iterator[pb.AppendTextRequest]:
            yield pb.AppendTextRequest(session_id="s", text="more ")
            first_sent.set()
            go_on.wait(30)  # the call stays open until the server is shutting down
            yield pb.AppendTextRequest(text="text")

        call = stub.AppendText.future(chunks(), timeout=60)
        assert first_sent.wait(30)
        # A round trip on the same connection, opened after the AppendText stream: the server
        # has taken that call before it answers this one, so SIGTERM finds it in flight.
        stub.GetSession(pb.GetSessionRequest(session_id="s"), timeout=30)
        server.process.send_signal(signal.SIGTERM)
        server.wait_for_log("shutting_down")
        go_on.set()
        error = call.exception()
        assert isinstance(error, grpc.RpcError)
        d = Details(error)
        assert (d.code, d.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
        retry = d._one(error_details_pb2.RetryInfo)
        assert retry is not None and retry.retry_delay.seconds >= 1
    assert server.wait() == 0


def _broken_server(server_factory: ServerFactory, tmp_path: Path) -> ServerHandle:
    """A server whose data directory has a garbage checkpoint "garbage" and a session "huge"
    whose model is over the server's limits (the file intact)."""
    first = server_factory(data_dir=tmp_path / "data")
    with first.client() as client:
        client.create_session(TEXT, session_id="huge", **{**SMALL, "hidden_size": 64})
    assert first.stop() == 0
    (tmp_path / "data" / "sessions" / "garbage.npz").write_bytes(b"\x00not a zip" * 10)
    return server_factory(data_dir=tmp_path / "data", max_hidden_size=32)


def test_broken_sessions_are_data_loss_or_failed_precondition(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A damaged checkpoint is DATA_LOSS (CHECKPOINT_DAMAGED); an intact one over this server's
    limits FAILED_PRECONDITION (SESSION_BROKEN); the client raises SessionBroken for both
    (never SessionBusy), and the CLI says "broken:" with exit code 11."""
    server = _broken_server(server_factory, tmp_path)
    channel, stub = _stub(server)
    with channel, server.client() as client:
        d = _fail(stub.Step, pb.StepRequest(session_id="garbage"))
        assert (d.code, d.reason) == (grpc.StatusCode.DATA_LOSS, "CHECKPOINT_DAMAGED")
        assert d.metadata["session_id"] == "garbage"
        d = _fail(stub.Step, pb.StepRequest(session_id="huge"))
        assert (d.code, d.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SESSION_BROKEN")
        assert d.metadata["session_id"] == "huge"

        for name, reason in (("garbage", "CHECKPOINT_DAMAGED"), ("huge", "SESSION_BROKEN")):
            with pytest.raises(SessionBroken) as raised:
                client.session(name).step()
            assert not isinstance(raised.value, SessionBusy)
            assert raised.value.reason == reason and raised.value.metadata["session_id"] == name

    cli = subprocess.run(
        [sys.executable, "-m", "rnnserve", "--address", server.address, "step", "huge"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 11, cli.stderr
    assert "broken:" in cli.stderr and "busy" not in cli.stderr


def test_the_client_exposes_reason_metadata_fields_and_retry(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(max_sessions=1)
    with server.client() as client:
        with pytest.raises(SessionNotFound) as not_found:
            client.session("ghost").info()
        assert not_found.value.reason == "SESSION_NOT_FOUND"
        assert not_found.value.metadata == {"session_id": "ghost"}
        assert not_found.value.retry_delay is None

        with pytest.raises(InvalidArgument) as invalid:
            client.create_session(TEXT, hidden_size=0)
        assert [v.field for v in invalid.value.field_violations] == ["config.hidden_size"]
        assert "config.hidden_size" in invalid.value.field_violations[0].description

        client.create_session(TEXT, session_id="one", **SMALL)
        with pytest.raises(LimitExceeded) as limit:
            client.create_session(TEXT, session_id="two", **SMALL)
        assert limit.value.metadata["limit"] == "max_sessions"


class _Trailers(grpc.RpcError):
    """A failed call's surface as the client sees it, with a google.rpc.Status trailer."""

    def __init__(self, code: grpc.StatusCode, status_message: status_pb2.Status) -> None:
        self._code = code
        self._status = status_message

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return str(self._status.message)

    def trailing_metadata(self) -> Any:  # the stubs' type is not what grpc returns
        return ((STATUS_DETAILS_KEY, self._status.SerializeToString()),)


# One domain error per reason, with what status.py must make of it.
CASES: list[tuple[BaseException, grpc.StatusCode, str, type[RnnServeError]]] = [
    (
        SessionNotFoundError("x", session_id="s"),
        grpc.StatusCode.NOT_FOUND,
        "SESSION_NOT_FOUND",
        SessionNotFound,
    ),
    (
        JobNotFoundError("x", session_id="s"),
        grpc.StatusCode.NOT_FOUND,
        "JOB_NOT_FOUND",
        JobNotFound,
    ),
    (
        NotSupportedError("x"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "NOT_SUPPORTED",
        RnnServeError,
    ),
    (
        NewerFormatError("x", session_id="s"),
        grpc.StatusCode.UNAVAILABLE,
        "NEWER_FORMAT",
        ServerUnavailable,
    ),
    (
        SessionExistsError("x", session_id="s"),
        grpc.StatusCode.ALREADY_EXISTS,
        "SESSION_EXISTS",
        RnnServeError,
    ),
    (SessionBusyError("x"), grpc.StatusCode.FAILED_PRECONDITION, "SESSION_BUSY", SessionBusy),
    (
        SessionBrokenError("x", damaged=False),
        grpc.StatusCode.FAILED_PRECONDITION,
        "SESSION_BROKEN",
        SessionBroken,
    ),
    (SessionBrokenError("x"), grpc.StatusCode.DATA_LOSS, "CHECKPOINT_DAMAGED", SessionBroken),
    (
        DivergedError("loss is nan"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "TRAINING_DIVERGED",
        TrainingDiverged,
    ),
    (
        InvalidArgumentError("top_k must be >= 0"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "FIELD_INVALID",
        InvalidArgument,
    ),
    (
        LimitExceededError("x", setting="max_sessions", limit=1, value=2),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "LIMIT_EXCEEDED",
        LimitExceeded,
    ),
    (StorageFullError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, "STORAGE_FULL", LimitExceeded),
    (StorageError("x"), grpc.StatusCode.UNAVAILABLE, "STORAGE_UNAVAILABLE", RnnServeError),
    (ShuttingDownError("x"), grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN", RnnServeError),
    (UnauthenticatedError("x"), grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", RnnServeError),
    (LeaseLostError.moved("s"), grpc.StatusCode.ABORTED, "LEASE_LOST", ServerUnavailable),
    (
        OwnerUnavailableError("x", session_id="s", retry_seconds=0.0),
        grpc.StatusCode.UNAVAILABLE,
        "OWNER_UNAVAILABLE",
        ServerUnavailable,
    ),
    (KeyError("boom"), grpc.StatusCode.INTERNAL, "INTERNAL", RnnServeError),
]


@pytest.mark.parametrize(("exc", "code", "reason", "cls"), CASES)
def test_every_reason_maps_to_its_code_and_client_class(
    exc: BaseException, code: grpc.StatusCode, reason: str, cls: type[RnnServeError]
) -> None:
    """status.py's mapping, and the client's reading of it (reason first, code second)."""
    message = status.status_for(exc)
    assert message.code == code.value[0]
    error = error_from_rpc(_Trailers(code, message))
    assert error.reason == reason and error.code is code
    assert isinstance(error, cls)
    retry = {
        "SHUTTING_DOWN",
        "STORAGE_FULL",
        "STORAGE_UNAVAILABLE",
        "OWNER_UNAVAILABLE",
        "NEWER_FORMAT",
    }
    assert (error.retry_delay is not None) == (reason in retry)


def test_the_proto_documents_exactly_the_reasons_sent() -> None:
    """Every ErrorReason value is sent for some error (CASES), and nothing else is."""
    assert {reason for _, _, reason, _ in CASES} == status.REASONS


def test_a_broken_session_is_mapped_by_reason_not_code() -> None:
    """FAILED_PRECONDITION alone would be SessionBusy: the reason decides."""
    message = status.status_for(SessionBrokenError("x", session_id="b", damaged=False))
    error = error_from_rpc(_Trailers(grpc.StatusCode.FAILED_PRECONDITION, message))
    assert type(error) is SessionBroken and error.metadata["session_id"] == "b"
