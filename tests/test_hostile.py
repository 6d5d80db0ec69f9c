"""Hostile and malformed requests, table-driven, against one real server with low limits.

Each case sends one request (or a short sequence) through the generated stub, or raw bytes
through a generic call where protobuf would refuse to serialize the message (lone surrogates,
corrupt wire format), and names the status code it must get. After all of them the server still
serves and the session made at the start is unchanged. Limits are set low here so "huge" hits
them cheaply; every RESOURCE_EXHAUSTED must name the flag and the environment variable.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

LIMITS: dict[str, int] = dict(
    max_sessions=300,
    max_corpus_bytes=20_000,
    max_total_corpus_bytes=2_000_000,
    max_alphabet_size=64,
    max_hidden_size=64,
    max_batch_size=8,
    max_seq_length=64,
    max_window_chars=256,
    max_train_steps=5_000,
    max_generate_length=2_000,
    max_text_chars=2_000,
    max_message_bytes=65_536,
)
MODULE_SERVER_SETTINGS: dict[str, Any] = dict(LIMITS)

TEXT = "the quick brown fox jumps over the lazy dog. " * 10
SMALL = pb.SessionConfig(hidden_size=8, seq_length=8, batch_size=2, seed=3)
I32, I64 = 2**31 - 1, 2**63 - 1
NAN, INF = math.nan, math.inf
BASE = "base"  # made once; must be unchanged at the end
DEADLINE = 20.0
OK = grpc.StatusCode.OK
IA = grpc.StatusCode.INVALID_ARGUMENT
RE = grpc.StatusCode.RESOURCE_EXHAUSTED
NF = grpc.StatusCode.NOT_FOUND
AE = grpc.StatusCode.ALREADY_EXISTS
FP = grpc.StatusCode.FAILED_PRECONDITION
DE = grpc.StatusCode.DEADLINE_EXCEEDED
_ids = itertools.count()


class H:
    """What a case gets: the stub, raw generic calls, and fresh sessions."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.stub = pb_grpc.RnnServiceStub(channel)

    def fresh(self, text: str = TEXT, config: pb.SessionConfig = SMALL) -> str:
        session_id = f"h{next(_ids)}"
        self.stub.CreateSession(
            pb.CreateSessionRequest(session_id=session_id, text=text, config=config),
            timeout=DEADLINE,
        )
        return session_id

    def raw_unary(self, method: str, body: bytes) -> None:
        call = self.channel.unary_unary(
            f"/rnnserve.v1.RnnService/{method}", request_serializer=None, response_deserializer=None
        )
        call(body, timeout=DEADLINE)

    def raw_stream(self, method: str, body: bytes) -> None:
        call = self.channel.unary_stream(
            f"/rnnserve.v1.RnnService/{method}", request_serializer=None, response_deserializer=None
        )
        list(call(body, timeout=DEADLINE))

    def raw_client_stream(self, method: str, bodies: list[bytes]) -> None:
        call = self.channel.stream_unary(
            f"/rnnserve.v1.RnnService/{method}", request_serializer=None, response_deserializer=None
        )
        call(iter(bodies), timeout=DEADLINE)

    # Typed shortcuts (streams are consumed to the end).
    def create(self, session_id: str = "", text: str = TEXT, alphabet: str = "", **kw: Any) -> None:
        preset = kw.pop("preset", pb.PRESET_UNSPECIFIED)
        config = pb.SessionConfig(hidden_size=8, seq_length=8, batch_size=2)
        for name, value in kw.items():
            setattr(config, name, value)
        session_id = session_id or f"c{next(_ids)}"
        request = pb.CreateSessionRequest(
            session_id=session_id, text=text, alphabet=alphabet, config=config, preset=preset
        )
        self.stub.CreateSession(request, timeout=DEADLINE)

    def train(self, session_id: str = BASE, **kw: Any) -> list[pb.TrainResponse]:
        request = pb.TrainRequest(session_id=session_id, **{"steps": 1, **kw})
        return list(self.stub.Train(request, timeout=DEADLINE))

    def generate(self, session_id: str = BASE, **kw: Any) -> str:
        request = pb.GenerateRequest(session_id=session_id, **{"length": 5, **kw})
        return "".join(r.text for r in self.stub.Generate(request, timeout=DEADLINE))

    def watch(self, session_id: str = BASE, from_step: int = 1, timeout: float = DEADLINE) -> None:
        request = pb.WatchLossRequest(session_id=session_id, from_step=from_step)
        for _ in self.stub.WatchLoss(request, timeout=timeout):
            pass

    def append(self, chunks: list[tuple[str, str]]) -> None:
        requests = (pb.AppendTextRequest(session_id=i, text=t) for i, t in chunks)
        self.stub.AppendText(requests, timeout=DEADLINE)


def _field(number: int, value: bytes) -> bytes:
    """One length-delimited protobuf field, written by hand (no UTF-8 check)."""
    size, out = len(value), bytearray([number << 3 | 2])
    while size > 0x7F:
        out.append(size & 0x7F | 0x80)
        size >>= 7
    out.append(size)
    return bytes(out) + value


LONE_SURROGATE = b"ab\xed\xa0\x80cd"  # U+D800 as (invalid) UTF-8: protobuf won't send it
CORRUPT = b"\x0a\xff\xff\xff\xff\x0f"


def _train_then(h: H, action: Callable[[H, str], None]) -> None:
    """Start a long Train on a fresh session, run action while it trains, then cancel."""
    session_id = h.fresh()
    stream: Any = h.stub.Train(
        pb.TrainRequest(session_id=session_id, steps=LIMITS["max_train_steps"], report_every=1),
        timeout=DEADLINE,
    )
    next(stream)
    try:
        action(h, session_id)
    finally:
        stream.cancel()


def _delete_while_training(h: H, session_id: str) -> None:
    h.stub.DeleteSession(pb.DeleteSessionRequest(session_id=session_id), timeout=DEADLINE)
    h.stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=DEADLINE)  # NF


def _step_while_training(h: H, session_id: str) -> None:
    h.stub.Step(pb.StepRequest(session_id=session_id), timeout=DEADLINE)


def _append_while_training(h: H, session_id: str) -> None:
    h.append([(session_id, "the fox")])


def _duplicate(h: H) -> None:
    session_id = h.fresh()
    h.create(session_id)


def _page_token_of(text: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(text).decode("ascii")


def _create_with_id(session_id: str) -> Callable[[H], None]:
    return lambda h: h.create(session_id=session_id)


def _get_with_id(session_id: str) -> Callable[[H], Any]:
    return lambda h: h.stub.GetSession(pb.GetSessionRequest(session_id=session_id))


@dataclass(frozen=True)
class Case:
    """One hostile request and the status code it must get."""

    name: str
    run: Callable[[H], Any]
    code: grpc.StatusCode
    mentions: str = ""  # a word the error details must contain


BAD_IDS = {
    "empty": "",
    "dotdot": "..",
    "parent-path": "../../etc/passwd",
    "slash": "a/b",
    "backslash": "a\\b",
    "nul": "a\x00b",
    "newline": "a\nb",
    "tab": "a\tb",
    "non-ascii": "caf\u00e9",
    "emoji": "\U0001f600",
    "leading-dash": "-x",
    "leading-dot": ".x",
    "space": "a b",
    "65-chars": "x" * 65,
    "10kB": "x" * 10_000,
}

CASES: list[Case] = [
    # --- CreateSession: every numeric config field ---
    Case("create hidden_size 0", lambda h: h.create(hidden_size=0), IA, "hidden_size"),
    Case("create hidden_size -5", lambda h: h.create(hidden_size=-5), IA, "hidden_size"),
    Case("create hidden_size huge", lambda h: h.create(hidden_size=I32), RE, "max-hidden-size"),
    Case("create seq_length 0", lambda h: h.create(seq_length=0), IA, "seq_length"),
    Case("create seq_length -1", lambda h: h.create(seq_length=-1), IA, "seq_length"),
    Case("create seq_length huge", lambda h: h.create(seq_length=I32), RE, "max-seq-length"),
    Case("create batch_size 0", lambda h: h.create(batch_size=0), IA, "batch_size"),
    Case("create batch_size -3", lambda h: h.create(batch_size=-3), IA, "batch_size"),
    Case("create batch_size huge", lambda h: h.create(batch_size=I32), RE, "max-batch-size"),
    Case(
        "create batch x seq over window limit",
        lambda h: h.create(batch_size=8, seq_length=64),
        RE,
        "max-window-chars",
    ),
    Case("create learning_rate 0", lambda h: h.create(learning_rate=0.0), IA, "learning_rate"),
    Case("create learning_rate <0", lambda h: h.create(learning_rate=-0.1), IA, "learning_rate"),
    Case("create learning_rate NaN", lambda h: h.create(learning_rate=NAN), IA, "learning_rate"),
    Case("create learning_rate inf", lambda h: h.create(learning_rate=INF), IA, "learning_rate"),
    Case("create learning_rate tiny", lambda h: h.create(learning_rate=5e-324), OK),
    Case("create learning_rate max", lambda h: h.create(learning_rate=1.7e308), OK),
    Case("create clip 0", lambda h: h.create(clip=0.0), IA, "clip"),
    Case("create clip NaN", lambda h: h.create(clip=NAN), IA, "clip"),
    Case("create clip -inf", lambda h: h.create(clip=-INF), IA, "clip"),
    Case("create seed -1", lambda h: h.create(seed=-1), IA, "seed"),
    Case("create seed int64 max", lambda h: h.create(seed=I64), OK),
    Case("create reset_every -1", lambda h: h.create(reset_every=-1), IA, "reset_every"),
    Case("create reset_every huge", lambda h: h.create(reset_every=I32), OK),
    Case("create optimizer 99", lambda h: h.create(optimizer=99), IA, "optimizer"),
    Case("create dtype 99", lambda h: h.create(dtype=99), IA, "dtype"),
    Case("create preset 99", lambda h: h.create(preset=99), IA, "preset"),
    # --- CreateSession: texts and alphabets ---
    Case("create empty text", lambda h: h.create(text=""), IA, "text"),
    Case("create one-char text", lambda h: h.create(text="a"), IA, "text"),
    Case("create text < window", lambda h: h.create(text="abc", seq_length=10), IA, "seq_length"),
    Case("create one distinct char", lambda h: h.create(text="aaaaaaaaaa", seq_length=2), OK),
    Case("create emoji+combining", lambda h: h.create(text="e\u0301\U0001f600x" * 20), OK),
    Case(
        "create alphabet repeats", lambda h: h.create(alphabet="aab", text="abab"), IA, "alphabet"
    ),
    Case("create text outside alphabet", lambda h: h.create(alphabet="ab", text="abc" * 5), IA),
    Case("create empty text + alphabet", lambda h: h.create(alphabet="ab", text=""), IA, "text"),
    Case("create corpus over limit", lambda h: h.create(text="ab" * 10_001), RE, "max-corpus"),
    Case(
        "create alphabet over limit",
        lambda h: h.create(text="".join(map(chr, range(0x100, 0x141))) * 2),
        RE,
        "max-alphabet-size",
    ),
    Case("create duplicate id", _duplicate, AE, "already exists"),
    Case(
        "create text lone surrogate (raw)",
        lambda h: h.raw_unary("CreateSession", _field(1, b"raw1") + _field(4, LONE_SURROGATE)),
        IA,
        "UTF-8",
    ),
    Case(
        "create message over max-message-bytes",
        lambda h: h.create(text="ab" * 40_000),
        RE,
        "max-message-bytes",
    ),
    Case("create corrupt bytes (raw)", lambda h: h.raw_unary("CreateSession", CORRUPT), IA),
    # --- session ids, on every RPC that takes one ---
    *(
        Case(f"create id {k}", _create_with_id(v), IA, "session_id")
        for k, v in BAD_IDS.items()
        if v
    ),
    *(Case(f"get id {k}", _get_with_id(v), IA, "session_id") for k, v in BAD_IDS.items()),
    Case(
        "delete id ..", lambda h: h.stub.DeleteSession(pb.DeleteSessionRequest(session_id="..")), IA
    ),
    Case("step id 10kB", lambda h: h.stub.Step(pb.StepRequest(session_id="x" * 10_000)), IA),
    Case("train id slash", lambda h: h.train("a/b"), IA),
    Case("watch id nul", lambda h: h.watch("a\x00"), IA),
    Case("generate id ..", lambda h: h.generate(".."), IA),
    Case(
        "predict id path",
        lambda h: h.stub.Predict(pb.PredictRequest(session_id="../x", text="ab")),
        IA,
    ),
    Case("append id path", lambda h: h.append([("../../x", "ab")]), IA),
    Case(
        "get unknown id", lambda h: h.stub.GetSession(pb.GetSessionRequest(session_id="nope")), NF
    ),
    Case(
        "delete unknown id",
        lambda h: h.stub.DeleteSession(pb.DeleteSessionRequest(session_id="nope")),
        NF,
    ),
    Case(
        "get id lone surrogate (raw)",
        lambda h: h.raw_unary("GetSession", _field(1, b"\xed\xb0\x80")),
        IA,
    ),
    # --- ListSessions ---
    Case(
        "list page_size -1", lambda h: h.stub.ListSessions(pb.ListSessionsRequest(page_size=-1)), IA
    ),
    Case(
        "list page_size huge",
        lambda h: h.stub.ListSessions(pb.ListSessionsRequest(page_size=I32)),
        OK,
    ),
    Case(
        "list page_token garbage",
        lambda h: h.stub.ListSessions(pb.ListSessionsRequest(page_token="garbage!")),
        IA,
        "page_token",
    ),
    Case(
        "list page_token non-ascii",
        lambda h: h.stub.ListSessions(pb.ListSessionsRequest(page_token="\u00e9\u00e9")),
        IA,
    ),
    Case(
        "list page_token b64 non-ascii",
        lambda h: h.stub.ListSessions(
            pb.ListSessionsRequest(page_token=_page_token_of("a:\u00e9".encode()))
        ),
        IA,
    ),
    Case(
        "list page_token b64 no tag",
        lambda h: h.stub.ListSessions(pb.ListSessionsRequest(page_token=_page_token_of(b"zzz"))),
        IA,
    ),
    Case(
        "list page_token 10kB",
        lambda h: h.stub.ListSessions(pb.ListSessionsRequest(page_token="A" * 10_000)),
        IA,
    ),
    # --- Step ---
    Case(
        "step empty text = corpus step",
        lambda h: h.stub.Step(pb.StepRequest(session_id=h.fresh())),
        OK,
    ),
    Case(
        "step one-char text",
        lambda h: h.stub.Step(pb.StepRequest(session_id=BASE, text="t")),
        IA,
        "text",
    ),
    Case(
        "step unknown chars",
        lambda h: h.stub.Step(pb.StepRequest(session_id=BASE, text="QZ!")),
        IA,
        "alphabet",
    ),
    Case(
        "step emoji",
        lambda h: h.stub.Step(pb.StepRequest(session_id=BASE, text="the \U0001f600")),
        IA,
    ),
    Case(
        "step combining mark",
        lambda h: h.stub.Step(pb.StepRequest(session_id=BASE, text="the\u0301")),
        IA,
    ),
    Case(
        "step text over limit",
        lambda h: h.stub.Step(pb.StepRequest(session_id=BASE, text="ab" * 1001)),
        RE,
        "max-text-chars",
    ),
    Case(
        "step text lone surrogate (raw)",
        lambda h: h.raw_unary("Step", _field(1, BASE.encode()) + _field(2, LONE_SURROGATE)),
        IA,
    ),
    Case("step unknown session", lambda h: h.stub.Step(pb.StepRequest(session_id="nope")), NF),
    Case("step while training", lambda h: _train_then(h, _step_while_training), FP, "training"),
    # --- Train ---
    Case("train steps 0", lambda h: h.train(steps=0), IA, "steps"),
    Case("train steps -1", lambda h: h.train(steps=-1), IA, "steps"),
    Case("train steps huge", lambda h: h.train(steps=I64), RE, "RNNSERVE_MAX_TRAIN_STEPS"),
    Case("train report_every -1", lambda h: h.train(h.fresh(), steps=2, report_every=-1), IA),
    Case("train report_every huge", lambda h: h.train(h.fresh(), steps=2, report_every=I64), OK),
    Case("train sample_length -1", lambda h: h.train(h.fresh(), sample_length=-1), IA),
    Case(
        "train sample_length huge",
        lambda h: h.train(h.fresh(), sample_length=I32),
        RE,
        "max-generate-length",
    ),
    Case("train unknown session", lambda h: h.train("nope"), NF),
    Case("train corrupt bytes (raw)", lambda h: h.raw_stream("Train", CORRUPT), IA),
    Case("delete while training", lambda h: _train_then(h, _delete_while_training), NF),
    # --- WatchLoss ---
    Case("watch from_step -1", lambda h: h.watch(from_step=-1), IA, "from_step"),
    Case("watch from_step huge waits", lambda h: h.watch(from_step=I64, timeout=0.3), DE),
    Case("watch unknown session", lambda h: h.watch("nope"), NF),
    # --- Generate ---
    Case("generate length 0", lambda h: h.generate(length=0), IA, "length"),
    Case("generate length -1", lambda h: h.generate(length=-1), IA, "length"),
    Case("generate length huge", lambda h: h.generate(length=I32), RE, "max-generate-length"),
    Case("generate temperature -1", lambda h: h.generate(temperature=-1.0), IA, "temperature"),
    Case("generate temperature NaN", lambda h: h.generate(temperature=NAN), IA, "temperature"),
    Case("generate temperature inf", lambda h: h.generate(temperature=INF), IA, "temperature"),
    Case("generate temperature 0", lambda h: h.generate(temperature=0.0), OK),
    Case("generate temperature -0.0", lambda h: h.generate(temperature=-0.0), OK),
    Case("generate temperature denormal", lambda h: h.generate(temperature=5e-324), OK),
    Case("generate temperature huge", lambda h: h.generate(temperature=1.7e308), OK),
    Case("generate top_k -1", lambda h: h.generate(top_k=-1), IA, "top_k"),
    Case("generate top_k huge", lambda h: h.generate(top_k=I32), OK),
    Case("generate seed -1", lambda h: h.generate(seed=-1), IA, "seed"),
    Case("generate seed int64 max", lambda h: h.generate(seed=I64), OK),
    Case("generate prime unknown", lambda h: h.generate(prime="\u00e9t\u00e9"), IA, "prime"),
    Case("generate prime one char", lambda h: h.generate(prime="t"), OK),
    Case("generate prime over limit", lambda h: h.generate(prime="t" * 2001), RE, "max-text-chars"),
    Case(
        "generate prime lone surrogate (raw)",
        lambda h: h.raw_stream("Generate", _field(1, BASE.encode()) + _field(2, LONE_SURROGATE)),
        IA,
    ),
    # --- Predict ---
    Case("predict empty", lambda h: h.stub.Predict(pb.PredictRequest(session_id=BASE)), IA, "text"),
    Case(
        "predict one char",
        lambda h: h.stub.Predict(pb.PredictRequest(session_id=BASE, text="t")),
        IA,
    ),
    Case(
        "predict two chars",
        lambda h: h.stub.Predict(pb.PredictRequest(session_id=BASE, text="th")),
        OK,
    ),
    Case(
        "predict unknown chars",
        lambda h: h.stub.Predict(pb.PredictRequest(session_id=BASE, text="TH")),
        IA,
    ),
    Case(
        "predict over limit",
        lambda h: h.stub.Predict(pb.PredictRequest(session_id=BASE, text="th" * 1001)),
        RE,
        "RNNSERVE_MAX_TEXT_CHARS",
    ),
    Case(
        "predict lone surrogate (raw)",
        lambda h: h.raw_unary("Predict", _field(1, BASE.encode()) + _field(2, LONE_SURROGATE)),
        IA,
    ),
    # --- AppendText ---
    Case("append no chunks", lambda h: h.append([]), IA, "chunk"),
    Case("append no id", lambda h: h.append([("", "the")]), IA, "session_id"),
    Case(
        "append mismatched id",
        lambda h: h.append([(BASE, "the"), (h.fresh(), "the")]),
        IA,
        "differs",
    ),
    Case("append unknown session", lambda h: h.append([("nope", "ab")]), NF),
    Case(
        "append unknown chars", lambda h: h.append([(BASE, "the"), (BASE, "THE")]), IA, "alphabet"
    ),
    Case(
        "append over corpus limit",
        lambda h: h.append([(h.fresh(), "the " * 2000)] * 3),
        RE,
        "max-corpus-bytes",
    ),
    Case(
        "append lone surrogate (raw)",
        lambda h: h.raw_client_stream(
            "AppendText", [_field(1, BASE.encode()) + _field(2, LONE_SURROGATE)]
        ),
        IA,
    ),
    Case(
        "append corrupt second chunk (raw)",
        lambda h: h.raw_client_stream("AppendText", [_field(1, BASE.encode()), CORRUPT]),
        IA,
    ),
    Case("append while training", lambda h: _train_then(h, _append_while_training), FP),
    Case("append empty chunk", lambda h: h.append([(h.fresh(), "")]), OK),
]


@pytest.fixture(scope="module")
def channel(module_server: ServerHandle) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(module_server.address) as ch:
        stub = pb_grpc.RnnServiceStub(ch)
        stub.CreateSession(
            pb.CreateSessionRequest(session_id=BASE, text=TEXT, config=SMALL), timeout=DEADLINE
        )
        list(stub.Train(pb.TrainRequest(session_id=BASE, steps=20), timeout=DEADLINE))
        yield ch


def _snapshot(stub: pb_grpc.RnnServiceStub) -> tuple[Any, ...]:
    info = stub.GetSession(pb.GetSessionRequest(session_id=BASE), timeout=DEADLINE).session
    predicted = stub.Predict(pb.PredictRequest(session_id=BASE, text=TEXT[:50]), timeout=DEADLINE)
    sample = "".join(
        r.text
        for r in stub.Generate(
            pb.GenerateRequest(session_id=BASE, length=50, seed=9), timeout=DEADLINE
        )
    )
    return info.step, info.corpus_chars, info.loss, predicted.loss, predicted.predicted, sample


@pytest.fixture(scope="module")
def base_before(channel: grpc.Channel) -> tuple[Any, ...]:
    return _snapshot(pb_grpc.RnnServiceStub(channel))


def test_enough_cases() -> None:
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_request(channel: grpc.Channel, base_before: tuple[Any, ...], case: Case) -> None:
    h = H(channel)
    try:
        case.run(h)
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    else:
        code, details = OK, ""
    assert code == case.code, f"{case.name}: got {code.name}: {details}"
    assert case.mentions in details
    if code == RE:  # a limit: the message names the setting as a flag and a variable
        assert "--max-" in details and "RNNSERVE_MAX_" in details, details


@pytest.mark.timeout(30)
def test_server_still_serves_after_all_cases(
    module_server: ServerHandle, channel: grpc.Channel, base_before: tuple[Any, ...]
) -> None:
    assert module_server.alive
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    stub = pb_grpc.RnnServiceStub(channel)
    assert _snapshot(stub) == base_before  # the base session is intact
    bad = [
        line
        for line in module_server.text_log().splitlines()
        if "internal_error" in line or '"code":"UNKNOWN"' in line  # compact JSON (orjson)
    ]
    assert bad == [], "\n".join(bad)
