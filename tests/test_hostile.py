"""Hostile and malformed requests, table-driven, against one real server with low limits.

Each case sends one request (or a short sequence) through the generated stub, or raw bytes
through a generic call where protobuf would refuse to serialize the message (lone surrogates,
corrupt wire format), and names the status code it must get. After all of them the server still
serves and the session made at the start is unchanged. Limits are set low here so "huge" hits
them cheaply; every RESOURCE_EXHAUSTED must name the flag and the environment variable.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tests.conftest import ServerFactory, ServerHandle

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
    max_import_bytes=200_000,
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


# ----- archives for ImportSession: a real export of BASE, then tampered with ------------


def _export(h: H, session_id: str = BASE) -> bytes:
    request = pb.ExportSessionRequest(session_id=session_id)
    return b"".join(r.data for r in h.stub.ExportSession(request, timeout=DEADLINE))


def _import(h: H, data: bytes, session_id: str | None = None, chunk: int = 60_000) -> None:
    new_id = f"i{next(_ids)}" if session_id is None else session_id
    requests = [
        pb.ImportSessionRequest(session_id=new_id if i == 0 else "", data=data[i : i + chunk])
        for i in range(0, max(len(data), 1), chunk)
    ]
    h.stub.ImportSession(iter(requests), timeout=DEADLINE)


def _npy(array: Any) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _entries(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def _zip(entries: dict[str, bytes], compression: int = 0) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as zf:
        for name, value in entries.items():
            zf.writestr(name, value)
    return buffer.getvalue()


def _meta(entries: dict[str, bytes]) -> dict[str, Any]:
    loaded: Any = json.loads(np.load(io.BytesIO(entries["meta.npy"])).tobytes())
    return dict(loaded)


def _with_meta(entries: dict[str, bytes], meta: dict[str, Any]) -> dict[str, bytes]:
    raw = json.dumps(meta).encode()
    return {**entries, "meta.npy": _npy(np.frombuffer(raw, dtype=np.uint8))}


def _tampered(change: Callable[[dict[str, bytes]], dict[str, bytes]]) -> Callable[[H], None]:
    return lambda h: _import(h, _zip(change(_entries(_export(h)))))


def _set_config(**fields: Any) -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    def change(entries: dict[str, bytes]) -> dict[str, bytes]:
        meta = _meta(entries)
        meta["trainer"]["config"].update(fields)
        return _with_meta(entries, meta)

    return change


def _set_meta(**fields: Any) -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    def change(entries: dict[str, bytes]) -> dict[str, bytes]:
        return _with_meta(entries, {**_meta(entries), **fields})

    return change


def _edit_meta(
    edit: Callable[[dict[str, Any]], object],
) -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    """An archive change that edits the meta object in place."""

    def change(entries: dict[str, bytes]) -> dict[str, bytes]:
        meta = _meta(entries)
        edit(meta)
        return _with_meta(entries, meta)

    return change


def _surrogate_alphabet(meta: dict[str, Any]) -> None:
    """The red team's archive: a lone surrogate (valid JSON: "\\ud800") in the alphabet."""
    meta["trainer"]["alphabet"] = "\ud800" + meta["trainer"]["alphabet"][1:]


def _replace(name: str, array: Any) -> Callable[[dict[str, bytes]], dict[str, bytes]]:
    return lambda entries: {**entries, name: _npy(array)}


def _huge_header(entries: dict[str, bytes]) -> dict[str, bytes]:
    """corpus.npy whose header claims 10^12 ids but carries a few bytes: must be refused
    from the header, before anything that size is allocated."""
    header = b"{'descr': '<i4', 'fortran_order': False, 'shape': (1000000000000,), }"
    header += b" " * (63 - len(header) % 64) + b"\n"
    return {
        **entries,
        "corpus.npy": b"\x93NUMPY\x01\x00"
        + len(header).to_bytes(2, "little")
        + header
        + b"\x00" * 16,
    }


def _object_array(entries: dict[str, bytes]) -> dict[str, bytes]:
    return {**entries, "trainer.Wxh.npy": _npy(np.array([{"x": 1}], dtype=object))}


def _bomb(h: H) -> None:
    """A deflated entry of 50 MB of zeros: a small archive that declares far more."""
    entries = _entries(_export(h))
    entries["trainer.extra.npy"] = b"\x00" * 50_000_000
    _import(h, _zip(entries, compression=zipfile.ZIP_DEFLATED))


def _update(session_id: str, paths: list[str], **config: Any) -> Callable[[H], None]:
    def run(h: H) -> None:
        request = pb.UpdateSessionRequest(
            session=pb.Session(
                session_id=h.fresh() if session_id == "fresh" else session_id,
                config=pb.SessionConfig(**config),
            )
        )
        request.update_mask.paths.extend(paths)
        h.stub.UpdateSession(request, timeout=DEADLINE)

    return run


def _update_while_training(h: H, session_id: str) -> None:
    _update(session_id, ["config.learning_rate"], learning_rate=0.01)(h)


def _fork(new_id: str, **config: Any) -> Callable[[H], None]:
    def run(h: H) -> None:
        request = pb.ForkSessionRequest(
            session_id=BASE, new_session_id=new_id, config=pb.SessionConfig(**config)
        )
        h.stub.ForkSession(request, timeout=DEADLINE)

    return run


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
        "create alphabet lone surrogate (raw)",
        lambda h: h.raw_unary(
            "CreateSession",
            _field(1, b"raw2") + _field(4, b"abab") + _field(5, b"ab\xed\xa0\x80"),
        ),
        IA,
        "UTF-8",
    ),
    Case(
        "import id lone surrogate (raw)",
        lambda h: h.raw_client_stream(
            "ImportSession", [_field(1, b"i\xed\xa0\x80") + _field(2, _export(h))]
        ),
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
    # A Train is an attached job: AppendText and UpdateSession apply between two chunks.
    Case("append while training", lambda h: _train_then(h, _append_while_training), OK),
    Case("append empty chunk", lambda h: h.append([(h.fresh(), "")]), OK),
    # --- UpdateSession ---
    Case("update empty mask", _update("fresh", []), IA, "update_mask"),
    Case("update hidden_size", _update("fresh", ["config.hidden_size"], hidden_size=9), IA, "fork"),
    Case("update seq_length", _update("fresh", ["config.seq_length"], seq_length=4), IA, "fork"),
    Case("update alphabet", _update("fresh", ["alphabet"]), IA, "changeable"),
    Case("update bad path", _update("fresh", ["config.nope"]), IA, "changeable"),
    Case("update lr NaN", _update("fresh", ["config.learning_rate"], learning_rate=NAN), IA),
    Case("update lr 0", _update("fresh", ["config.learning_rate"]), IA, "learning_rate"),
    Case("update clip inf", _update("fresh", ["config.clip"], clip=INF), IA, "clip"),
    Case("update reset_every <0", _update("fresh", ["config.reset_every"], reset_every=-1), IA),
    Case("update optimizer 99", _update("fresh", ["config.optimizer"], optimizer=99), IA),
    Case("update unknown session", _update("nope", ["config.clip"], clip=1.0), NF),
    Case("update bad id", _update("../x", ["config.clip"], clip=1.0), IA, "session_id"),
    Case("update while training", lambda h: _train_then(h, _update_while_training), OK),
    # --- ForkSession ---
    Case("fork onto existing id", _fork(BASE), AE),
    Case("fork empty new id", _fork(""), IA, "new_session_id"),
    Case("fork bad new id", _fork("../../x"), IA, "session_id"),
    Case("fork hidden_size", _fork("fk1", hidden_size=16), IA, "fork"),
    Case("fork lr -1", _fork("fk2", learning_rate=-1.0), IA, "learning_rate"),
    Case("fork ok", _fork("fk3", learning_rate=0.01), OK),
    # --- ExportSession ---
    Case(
        "export unknown session",
        lambda h: h.raw_stream("ExportSession", _field(1, b"nope")),
        NF,
    ),
    # --- ImportSession: hostile archives ---
    Case("import round trip", lambda h: _import(h, _export(h)), OK),
    Case("import not a zip", lambda h: _import(h, b"hello, this is not an archive"), IA, "zip"),
    Case("import no bytes", lambda h: _import(h, b""), IA, "no archive bytes"),
    Case("import over max_import_bytes", lambda h: _import(h, b"x" * 250_000), RE, "import"),
    Case("import taken id", lambda h: _import(h, _export(h), BASE), AE),
    Case("import bad id", lambda h: _import(h, _export(h), "../evil"), IA, "session_id"),
    Case("import truncated", lambda h: _import(h, _export(h)[:3000]), IA),
    Case(
        "import path entry name",
        _tampered(lambda e: {**e, "../evil.npy": e["corpus.npy"]}),
        IA,
        "unexpected entry",
    ),
    Case("import pickled object array", _tampered(_object_array), IA, "dtype"),
    Case("import header claims 10^12 ids", _tampered(_huge_header), IA, "does not match"),
    Case("import deflate bomb", _bomb, IA, "declare"),
    Case("import hidden_size over limit", _tampered(_set_config(hidden_size=1024)), RE, "hidden"),
    Case("import hidden_size 0", _tampered(_set_config(hidden_size=0)), IA, "hidden_size"),
    Case("import unknown config field", _tampered(_set_config(evil=1)), IA, "evil"),
    Case(
        "import alphabet over limit",
        _tampered(
            lambda e: _with_meta(
                e,
                {
                    **_meta(e),
                    "trainer": {
                        **_meta(e)["trainer"],
                        "alphabet": "".join(map(chr, range(65, 165))),
                    },
                },
            )
        ),
        RE,
        "max-alphabet-size",
    ),
    Case("import version 99", _tampered(_set_meta(version=99)), IA, "version"),
    Case("import wrong format tag", _tampered(_set_meta(format="pickle")), IA, "format"),
    Case("import step mismatch", _tampered(_set_meta(step=5)), IA, "loss_history"),
    Case(
        "import meta not JSON",
        _tampered(lambda e: {**e, "meta.npy": _npy(np.frombuffer(b"{[", "u1"))}),
        IA,
        "JSON",
    ),
    Case(
        "import deep JSON",
        _tampered(
            lambda e: {
                **e,
                "meta.npy": _npy(np.frombuffer(b"[" * 100_000, "u1")),
            }
        ),
        IA,
        "JSON",
    ),
    Case(
        "import weights wrong shape",
        _tampered(_replace("trainer.Whh.npy", np.zeros((3, 3), "f4"))),
        IA,
        "Whh",
    ),
    Case(
        "import weights NaN",
        _tampered(
            lambda e: {
                **e,
                "trainer.bh.npy": _npy(np.full(8, math.nan, "f4")),
            }
        ),
        IA,
        "NaN",
    ),
    Case(
        "import negative cursors",
        _tampered(_replace("trainer.cursors.npy", np.array([-(10**12), 5], dtype=np.int64))),
        IA,
        "cursors",
    ),
    Case("import NaN loss", _tampered(_set_meta(loss=NAN)), IA, "finite"),
    Case(
        "import corpus id out of range",
        _tampered(_replace("corpus.npy", np.full(450, 999, "<i4"))),
        IA,
    ),
    Case(
        "import missing corpus",
        _tampered(lambda e: {k: v for k, v in e.items() if k != "corpus.npy"}),
        IA,
        "corpus",
    ),
    # --- ImportSession: strings UTF-8 can't encode (issue 16 item 4), anywhere in meta ---
    Case(
        "import alphabet lone surrogate",
        _tampered(_edit_meta(_surrogate_alphabet)),
        IA,
        "trainer.alphabet (character 0) holds a lone surrogate",
    ),
    Case(
        "import session_id lone surrogate",
        _tampered(_set_meta(session_id="ab\udc00")),
        IA,
        "session_id",
    ),
    Case(
        "import meta key lone surrogate",
        _tampered(_edit_meta(lambda m: m.update({"\ud800": 1}))),
        IA,
        "surrogate",
    ),
    Case(
        "import config key lone surrogate",
        _tampered(_set_config(**{"x\udfff": 1})),
        IA,
        "surrogate",
    ),
    Case(
        "import optimizer lone surrogate",
        _tampered(_set_config(optimizer="adam\ud800")),
        IA,
        "surrogate",
    ),
    Case(
        "import validation lone surrogate",
        _tampered(_set_meta(validation=[[1, "\ud800"]])),
        IA,
        "validation",
    ),
    # --- ImportSession: within version 1, nothing the version does not have ---
    Case("import unknown meta key", _tampered(_set_meta(extra=1)), IA, "'extra'"),
    Case(
        "import unknown trainer key",
        _tampered(_edit_meta(lambda m: m["trainer"].update(extra=1))),
        IA,
        "unknown trainer key(s) 'extra'",
    ),
    Case(
        "import unknown trainer.optim key",
        _tampered(_edit_meta(lambda m: m["trainer"]["optim"].update(beta9=0))),
        IA,
        "trainer.optim has unknown key(s) 'beta9'",
    ),
    Case(
        "import missing trainer.optim key",
        _tampered(_edit_meta(lambda m: m["trainer"].update(optim={}))),
        IA,
        "trainer.optim has no 't'",
    ),
    Case(
        "import adam step count -1",
        _tampered(_edit_meta(lambda m: m["trainer"]["optim"].update(t=-1))),
        IA,
        "trainer.optim.t",
    ),
    Case(
        "import unknown dropout_rng key",
        _tampered(_edit_meta(lambda m: m["trainer"]["dropout_rng"].update(extra=1))),
        IA,
        "trainer.dropout_rng",
    ),
    Case(
        "import unknown trainer array",
        _tampered(_replace("trainer.extra.npy", np.zeros(3, "f4"))),
        IA,
        "'trainer.extra'",
    ),
    Case(
        "import unknown trainer.optim array",
        _tampered(_replace("trainer.optim.beta.npy", np.zeros(3, "f4"))),
        IA,
        "'trainer.optim.beta'",
    ),
    Case("import seed over int64", _tampered(_set_config(seed=2**63)), IA, "seed"),
    Case(
        "import validation step 0",
        _tampered(_set_meta(validation=[[0, 1.5]])),
        IA,
        "validation",
    ),
    # --- ImportSession: the versioning rule ---
    Case(
        "import newer version",
        _tampered(_set_meta(version=3)),
        IA,
        "format version 3, newer than this server reads (version 2)",
    ),
    Case("import version 0", _tampered(_set_meta(version=0)), IA, "version"),
    Case("import version as text", _tampered(_set_meta(version="1")), IA, "version"),
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
    assert _list_all(stub)[BASE].state == pb.SESSION_STATE_READY  # every page still answers
    bad = [
        line
        for line in module_server.text_log().splitlines()
        if "internal_error" in line or '"code":"UNKNOWN"' in line  # compact JSON (orjson)
    ]
    assert bad == [], "\n".join(bad)


def _list_all(stub: pb_grpc.RnnServiceStub) -> dict[str, pb.Session]:
    """Every session, page by page (small pages: each one must answer)."""
    listed: dict[str, pb.Session] = {}
    token = ""
    while True:
        page = stub.ListSessions(
            pb.ListSessionsRequest(page_size=7, page_token=token), timeout=DEADLINE
        )
        listed.update((s.session_id, s) for s in page.sessions)
        token = page.next_page_token
        if not token:
            return listed


@pytest.mark.timeout(30)
def test_a_hostile_import_writes_nothing(
    module_server: ServerHandle, channel: grpc.Channel, base_before: tuple[Any, ...]
) -> None:
    """Issue 16 item 4: the archive with a lone surrogate in its alphabet was adopted and
    written before the reply failed (INTERNAL); every ListSessions page holding it failed from
    then on, also after a restart. Now it is refused before anything is written."""
    h = H(channel)
    archive = _zip(_edit_meta(_surrogate_alphabet)(_entries(_export(h))))
    with pytest.raises(grpc.RpcError) as refused:
        _import(h, archive, "surrogate-alphabet")
    assert refused.value.code() == IA
    assert "alphabet" in (refused.value.details() or "")
    assert "surrogate-alphabet" not in _list_all(h.stub)
    with pytest.raises(grpc.RpcError) as missing:
        h.stub.GetSession(pb.GetSessionRequest(session_id="surrogate-alphabet"), timeout=DEADLINE)
    assert missing.value.code() == NF
    files = sorted(p.name for p in (module_server.data_dir / "sessions").iterdir())
    assert not [name for name in files if name.startswith("surrogate-alphabet")], files


def _plant(path: Path, edit: Callable[[dict[str, Any]], object], **extra: np.ndarray) -> None:
    """Rewrite a checkpoint on disk (bypassing every check an import makes): its meta edited
    in place, ``extra`` arrays added."""
    with np.load(path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    meta = json.loads(arrays["meta"].tobytes())
    edit(meta)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    arrays.update(extra)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


# Checkpoints a server could not describe or resume (each was INTERNAL on some call), planted
# on disk: (session id, edit of the meta, extra arrays, a word of the reason).
PLANTED: list[tuple[str, Callable[[dict[str, Any]], object], dict[str, np.ndarray], str]] = [
    ("alphabet", _surrogate_alphabet, {}, "surrogate"),
    ("key", lambda m: m["trainer"]["config"].update({"\udc00": 1}), {}, "surrogate"),
    ("time", lambda m: m.update(create_time=1e300), {}, "create_time"),
    ("adam", lambda m: m["trainer"]["optim"].update(t=-1), {}, "trainer.optim.t"),
    ("array", lambda m: None, {"trainer.extra": np.zeros(3, "f4")}, "trainer.extra"),
]


@pytest.mark.timeout(90)
def test_planted_checkpoints_are_listed_broken_with_a_reason(
    server_factory: ServerFactory,
) -> None:
    """A session that can't be turned into a reply never takes ListSessions or GetSession of
    the others down: it is listed BROKEN, with the reason, also after a restart."""
    first = server_factory()
    with grpc.insecure_channel(first.address) as ch:
        h = H(ch)
        for name in ["good", *(p[0] for p in PLANTED)]:
            h.stub.CreateSession(
                pb.CreateSessionRequest(session_id=name, text=TEXT, config=SMALL),
                timeout=DEADLINE,
            )
    assert first.stop() == 0
    for name, edit, extra, _ in PLANTED:
        _plant(first.data_dir / "sessions" / f"{name}.npz", edit, **extra)

    second = server_factory(data_dir=first.data_dir)
    with grpc.insecure_channel(second.address) as ch:
        h = H(ch)
        listed = _list_all(h.stub)
        assert listed["good"].state == pb.SESSION_STATE_READY
        for name, _, _, reason in PLANTED:
            entry = listed[name]
            assert entry.state == pb.SESSION_STATE_BROKEN, name
            assert entry.error.startswith("its ") and reason in entry.error, entry.error
            got = h.stub.GetSession(pb.GetSessionRequest(session_id=name), timeout=DEADLINE)
            assert got.session.state == pb.SESSION_STATE_BROKEN
        good = h.stub.GetSession(pb.GetSessionRequest(session_id="good"), timeout=DEADLINE)
        assert good.session.alphabet == "".join(sorted(set(TEXT)))
        assert _export(h, "good")
        h.stub.Step(pb.StepRequest(session_id="good"), timeout=DEADLINE)
        with pytest.raises(grpc.RpcError) as broken:
            h.stub.Step(pb.StepRequest(session_id="adam"), timeout=DEADLINE)
        assert broken.value.code() == grpc.StatusCode.DATA_LOSS
        h.stub.DeleteSession(pb.DeleteSessionRequest(session_id="alphabet"), timeout=DEADLINE)
        assert "alphabet" not in _list_all(h.stub)
    assert second.stop() == 0
    assert "internal_error" not in second.text_log()
