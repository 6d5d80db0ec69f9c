"""Hypothesis fuzz: random requests to every RPC of a real server, and random bytes to each.

Whatever is sent, the answer is OK or a deliberate status code, never UNKNOWN or INTERNAL (an
uncaught exception), and the server stays alive and SERVING. Limits are low so random sizes
hit them rather than run long; examples are bounded so the module runs in well under a minute.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

MODULE_SERVER_SETTINGS: dict[str, Any] = dict(
    max_sessions=5_000,
    max_corpus_bytes=5_000,
    max_hidden_size=32,
    max_batch_size=4,
    max_seq_length=32,
    max_train_steps=40,
    max_generate_length=300,
    max_text_chars=500,
    max_message_bytes=32_768,
)
FORBIDDEN = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.DATA_LOSS,
}
TEXT = "a quick brown fox jumps over the lazy dog; 0123456789. " * 4
KNOWN = ("f0", "f1", "f2")
DEADLINE = 10.0
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure reproduces
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

I32 = st.integers(-(2**31), 2**31 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)
DOUBLES = st.floats(allow_nan=True, allow_infinity=True)
# Characters from the corpus, others, emoji and combining marks (no surrogates: protobuf
# refuses to serialize them client-side; test_hostile sends those as raw bytes).
TEXTS = st.one_of(
    st.text(alphabet=st.sampled_from(sorted(set(TEXT))), max_size=60),
    st.text(max_size=40),
    st.text(alphabet="ab\u0301\U0001f600\u200d\x00\n", max_size=20),
)
IDS = st.one_of(
    st.sampled_from([*KNOWN, "", "nope", "..", "../x", "a/b", "x" * 65]),
    st.text(max_size=70),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True),
)


def _optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


@st.composite
def configs(draw: st.DrawFn) -> pb.SessionConfig:
    config = pb.SessionConfig()
    small = st.one_of(st.integers(-3, 40), I32)
    for name in ("hidden_size", "seq_length", "batch_size", "reset_every"):
        value = draw(_optional(small))
        if value is not None:
            setattr(config, name, value)
    for name in ("learning_rate", "clip"):
        value = draw(_optional(st.one_of(DOUBLES, st.floats(1e-4, 1.0))))
        if value is not None:
            setattr(config, name, value)
    seed = draw(_optional(I64))
    if seed is not None:
        config.seed = seed
    # Enum fields take any int32 on the wire (proto3 open enums).
    config.optimizer = cast(Any, draw(st.one_of(st.integers(0, 3), I32)))
    config.dtype = cast(Any, draw(st.one_of(st.integers(0, 2), I32)))
    return config


@pytest.fixture(scope="module")
def stub(module_server: ServerHandle) -> Iterator[pb_grpc.RnnServiceStub]:
    with grpc.insecure_channel(module_server.address) as channel:
        s = pb_grpc.RnnServiceStub(channel)
        for session_id in KNOWN:
            config = pb.SessionConfig(hidden_size=8, seq_length=8, batch_size=2, seed=1)
            s.CreateSession(
                pb.CreateSessionRequest(session_id=session_id, text=TEXT, config=config),
                timeout=DEADLINE,
            )
        yield s


def _check(call: Any) -> None:
    """Run the call (consuming a stream); fail on a forbidden status code."""
    try:
        result = call()
        if hasattr(result, "__next__"):
            for _ in result:
                pass
    except grpc.RpcError as err:
        assert err.code() not in FORBIDDEN, f"{err.code().name}: {err.details()}"


@pytest.mark.timeout(120)
@FUZZ
@given(
    session_id=IDS,
    preset=st.one_of(st.integers(0, 3), I32),
    config=configs(),
    text=TEXTS,
    alphabet=st.one_of(st.just(""), TEXTS),
)
def test_fuzz_create_session(
    stub: pb_grpc.RnnServiceStub,
    session_id: str,
    preset: int,
    config: pb.SessionConfig,
    text: str,
    alphabet: str,
) -> None:
    request = pb.CreateSessionRequest(
        session_id=session_id, preset=cast(Any, preset), config=config, text=text, alphabet=alphabet
    )
    _check(lambda: stub.CreateSession(request, timeout=DEADLINE))


@pytest.mark.timeout(120)
@FUZZ
@given(
    session_id=IDS,
    page_size=I32,
    page_token=st.one_of(st.just(""), st.text(max_size=40)),
    text=TEXTS,
)
def test_fuzz_get_list_step_predict(
    stub: pb_grpc.RnnServiceStub, session_id: str, page_size: int, page_token: str, text: str
) -> None:
    _check(lambda: stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=DEADLINE))
    _check(
        lambda: stub.ListSessions(
            pb.ListSessionsRequest(page_size=page_size, page_token=page_token), timeout=DEADLINE
        )
    )
    _check(lambda: stub.Step(pb.StepRequest(session_id=session_id, text=text), timeout=DEADLINE))
    _check(
        lambda: stub.Predict(pb.PredictRequest(session_id=session_id, text=text), timeout=DEADLINE)
    )


@pytest.mark.timeout(120)
@FUZZ
@given(
    session_id=IDS,
    steps=st.one_of(st.integers(-2, 45), I64),
    report_every=st.one_of(st.integers(-2, 10), I64),
    sample_length=st.one_of(st.integers(-2, 20), I32),
    from_step=st.one_of(st.integers(-2, 5), I64),
)
def test_fuzz_train_and_watch(
    stub: pb_grpc.RnnServiceStub,
    session_id: str,
    steps: int,
    report_every: int,
    sample_length: int,
    from_step: int,
) -> None:
    request = pb.TrainRequest(
        session_id=session_id, steps=steps, report_every=report_every, sample_length=sample_length
    )
    _check(lambda: stub.Train(request, timeout=DEADLINE))
    watch = pb.WatchLossRequest(session_id=session_id, from_step=from_step)
    # A watch is live: it runs until its deadline (DEADLINE_EXCEEDED) unless it is refused.
    _check(lambda: stub.WatchLoss(watch, timeout=0.1))


@pytest.mark.timeout(120)
@FUZZ
@given(
    session_id=IDS,
    prime=TEXTS,
    length=st.one_of(st.integers(-2, 400), I32),
    temperature=_optional(st.one_of(DOUBLES, st.floats(0, 3))),
    top_k=st.one_of(st.integers(-2, 60), I32),
    seed=_optional(I64),
)
def test_fuzz_generate(
    stub: pb_grpc.RnnServiceStub,
    session_id: str,
    prime: str,
    length: int,
    temperature: float | None,
    top_k: int,
    seed: int | None,
) -> None:
    request = pb.GenerateRequest(session_id=session_id, prime=prime, length=length, top_k=top_k)
    if temperature is not None:
        request.temperature = temperature
    if seed is not None:
        request.seed = seed
    texts: list[str] = []

    def call() -> None:
        texts.extend(r.text for r in stub.Generate(request, timeout=DEADLINE))

    _check(call)
    if texts and temperature is not None and math.isfinite(temperature):
        assert len("".join(texts)) == length


@pytest.mark.timeout(120)
@FUZZ
@given(
    chunks=st.lists(st.tuples(IDS, TEXTS), max_size=4),
    delete=st.booleans(),
)
def test_fuzz_append_and_delete(
    stub: pb_grpc.RnnServiceStub, chunks: list[tuple[str, str]], delete: bool
) -> None:
    requests = [pb.AppendTextRequest(session_id=i, text=t) for i, t in chunks]
    _check(lambda: stub.AppendText(iter(requests), timeout=DEADLINE))
    if delete and chunks and chunks[0][0] not in KNOWN:
        _check(
            lambda: stub.DeleteSession(
                pb.DeleteSessionRequest(session_id=chunks[0][0]), timeout=DEADLINE
            )
        )


METHODS = [
    ("CreateSession", "unary"),
    ("GetSession", "unary"),
    ("ListSessions", "unary"),
    ("DeleteSession", "unary"),
    ("Step", "unary"),
    ("Predict", "unary"),
    ("Train", "stream"),
    ("Generate", "stream"),
    ("WatchLoss", "stream"),
    ("AppendText", "client_stream"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("method", "kind"), METHODS)
@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=st.binary(max_size=64))
def test_fuzz_raw_bytes(
    module_server: ServerHandle, stub: pb_grpc.RnnServiceStub, method: str, kind: str, body: bytes
) -> None:
    """Arbitrary bytes as a request message: a decoding error or a normal answer."""
    with grpc.insecure_channel(module_server.address) as channel:
        path = f"/rnnserve.v1.RnnService/{method}"
        if kind == "unary":
            call: Any = channel.unary_unary(
                path, request_serializer=None, response_deserializer=None
            )
            _check(lambda: call(body, timeout=DEADLINE))
        elif kind == "stream":
            call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            _check(lambda: call(body, timeout=0.5 if method == "WatchLoss" else DEADLINE))
        else:
            call = channel.stream_unary(path, request_serializer=None, response_deserializer=None)
            _check(lambda: call(iter([body, body]), timeout=DEADLINE))


@pytest.mark.timeout(30)
def test_server_alive_and_serving_after_fuzz(
    module_server: ServerHandle, stub: pb_grpc.RnnServiceStub
) -> None:
    assert module_server.alive
    with grpc.insecure_channel(module_server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=DEADLINE).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    info = stub.GetSession(pb.GetSessionRequest(session_id="f0"), timeout=DEADLINE).session
    assert info.state in (pb.SESSION_STATE_READY, pb.SESSION_STATE_TRAINING)
    bad = [
        line
        for line in module_server.text_log().splitlines()
        if "internal_error" in line or '"code":"UNKNOWN"' in line  # compact JSON (orjson)
    ]
    assert bad == [], "\n".join(bad)
