"""The service over the wire: a real server subprocess on a loopback port, via rnnserve.Client."""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rnnserve import (
    Client,
    InvalidArgument,
    LimitExceeded,
    SessionBusy,
    SessionExists,
    SessionNotFound,
    TrainingDiverged,
)
from rnnserve.client import Session, TrainStream
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from tests.conftest import ServerFactory, ServerHandle

# A corpus long enough that a Train of many steps runs for a while.
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. " * 40
_ids = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}-{time.monotonic_ns() % 10**9}"


@pytest.fixture
def client(module_server: ServerHandle) -> Iterator[Client]:
    with module_server.client() as c:
        yield c


def small_session(client: Client, prefix: str = "s", **overrides: object) -> Session:
    options: dict[str, object] = dict(hidden_size=32, seq_length=16, batch_size=2, seed=7)
    options.update(overrides)
    return client.create_session(TEXT, session_id=new_id(prefix), **options)  # type: ignore[arg-type]


def start_long_train(session: Session) -> tuple[TrainStream, pb.TrainResponse]:
    """A Train that won't finish by itself, and its first progress message."""
    stream = session.train(1_000_000, report_every=5)
    return stream, next(stream)


@pytest.mark.timeout(60)
def test_seed_case_over_the_wire(client: Client) -> None:
    """The notebook's hyperparameters learn `Hallo` -> `alloH` in 30 Step calls."""
    s = client.create_session(
        "Hallo",
        session_id=new_id("seed"),
        preset="notebook",
        hidden_size=100,
        seq_length=5,
        learning_rate=0.1,
        optimizer="sgd",
        seed=0,
    )
    info = s.info()
    assert info.config.hidden_size == 100 and info.config.optimizer == pb.OPTIMIZER_SGD
    assert info.alphabet == "Halo" and info.corpus_chars == 5
    losses = [s.step().loss for _ in range(30)]
    assert losses[-1] < losses[0]
    prediction = s.predict("Hallo")
    assert prediction.predicted == "alloH"
    assert prediction.bits_per_char == pytest.approx(prediction.loss / 0.6931471805599453)
    assert s.info().step == 30


@pytest.mark.timeout(60)
def test_step_on_text(client: Client) -> None:
    s = small_session(client)
    r = s.step("quick brown")
    assert r.step == 1 and r.chars > 0 and r.loss > 0
    with pytest.raises(InvalidArgument, match="text"):
        s.step("quick \u2603")  # not in the alphabet


@pytest.mark.timeout(60)
def test_train_stream_progress_and_final(client: Client) -> None:
    s = small_session(client)
    messages = list(s.train(100, report_every=20, sample_length=12))
    progress, final = messages[:-1], messages[-1]
    assert [m.steps_done for m in progress] == [20, 40, 60, 80]
    assert all(m.stop_reason == pb.STOP_REASON_UNSPECIFIED for m in progress)
    assert all(len(m.sample) == 12 for m in progress)
    assert final.stop_reason == pb.STOP_REASON_COMPLETED
    assert final.step == 100 and final.steps_done == 100
    assert final.chars_per_second > 0 and final.elapsed_seconds > 0
    info = s.info()
    assert info.step == 100 and info.state == pb.SESSION_STATE_READY
    assert info.checkpointed_step == 100  # Train checkpoints before its final message
    assert info.loss == pytest.approx(final.loss)


@pytest.mark.timeout(60)
def test_train_cancel_midway_leaves_session_consistent(module_server: ServerHandle) -> None:
    with module_server.client() as client:
        s = small_session(client, "cancel")
        mark = module_server.mark()
        stream, first = start_long_train(s)
        assert first.steps_done == 5
        stream.cancel()
        done = module_server.wait_for_log("train_finished", start=mark, session_id=s.id)
        assert done["cause"] == "cancelled"
        info = s.info()
        assert info.state == pb.SESSION_STATE_READY
        assert 5 <= info.step == done["step"] < 1_000_000
        points = list(itertools.islice(s.watch_loss(1), info.step))
        assert [p.step for p in points] == list(range(1, info.step + 1))
        again = s.train(10).wait()
        assert again.stop_reason == pb.STOP_REASON_COMPLETED
        assert again.step == info.step + 10


@pytest.mark.timeout(60)
def test_two_watchers_see_the_same_updates(module_server: ServerHandle) -> None:
    steps = 60
    with module_server.client() as trainer:
        s = small_session(trainer, "watched")
        seen: list[list[tuple[int, float]]] = [[], []]
        ready = threading.Barrier(3)

        def watch(slot: int) -> None:
            with module_server.client() as c:
                stream = c.session(s.id).watch_loss(1)
                ready.wait()
                for point in stream:
                    seen[slot].append((point.step, point.loss))
                    if point.step == steps:
                        break

        threads = [threading.Thread(target=watch, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        ready.wait()
        final = s.train(steps - 10, report_every=7).wait()
        for _ in range(10):
            s.step()
        assert final.step == steps - 10
        for t in threads:
            t.join(30)
        assert [step for step, _ in seen[0]] == list(range(1, steps + 1))
        assert seen[0] == seen[1]


@pytest.mark.timeout(60)
def test_watch_ends_when_session_deleted(module_server: ServerHandle) -> None:
    with module_server.client() as client:
        s = small_session(client, "gone")
        s.step()
        stream = s.watch_loss(1)
        assert next(stream).step == 1
        s.delete()
        assert list(stream) == []  # ends cleanly, no error


@pytest.mark.timeout(60)
def test_generate_reproducible_for_a_seed(client: Client) -> None:
    s = small_session(client)
    s.train(30).wait()
    a = s.generate(700, prime="The ", temperature=0.8, seed=42)
    b = s.generate(700, prime="The ", temperature=0.8, seed=42)
    assert a == b and len(a) == 700
    chunks = list(s.generate_stream(1200, seed=3))
    assert len(chunks) > 1 and len("".join(chunks)) == 1200
    assert set(a) <= set(s.info().alphabet)


@pytest.mark.timeout(120)
def test_pagination_over_250_sessions(server: ServerHandle) -> None:
    with server.client() as client:
        ids = [f"p{i:03d}" for i in range(250)]
        for session_id in reversed(ids):
            client.create_session("abcabc", session_id=session_id, hidden_size=4, seq_length=2)
        stub = pb_grpc.RnnServiceStub(client._channel)
        pages, token = [], ""
        while True:
            page = stub.ListSessions(pb.ListSessionsRequest(page_size=100, page_token=token))
            assert page.total_size == 250
            pages.append([x.session_id for x in page.sessions])
            token = page.next_page_token
            if not token:
                break
        assert [len(p) for p in pages] == [100, 100, 50]
        assert [x for p in pages for x in p] == ids
        assert [x.session_id for x in client.list_sessions(page_size=7)] == ids
        with pytest.raises(grpc.RpcError) as err:
            stub.ListSessions(pb.ListSessionsRequest(page_token="garbage!"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.timeout(60)
def test_status_codes(client: Client) -> None:
    with pytest.raises(SessionNotFound, match="does not exist"):
        client.session("no-such-session").info()
    s = small_session(client, "dup")
    with pytest.raises(SessionExists, match="already exists"):
        client.create_session(TEXT, session_id=s.id)
    for bad_id in ("../etc", "a/b", "-x", "x" * 65, "caf\u00e9", "nul\x00"):
        with pytest.raises(InvalidArgument, match="session_id"):
            client.create_session(TEXT, session_id=bad_id)
    with pytest.raises(InvalidArgument, match="hidden_size"):
        client.create_session(TEXT, session_id=new_id("bad"), hidden_size=0)
    with pytest.raises(InvalidArgument, match="temperature"):
        s.generate(10, temperature=-1)
    with pytest.raises(InvalidArgument, match="steps"):
        s.train(0).wait()
    with pytest.raises(LimitExceeded, match="max-hidden-size"):
        client.create_session(TEXT, session_id=new_id("big"), hidden_size=100_000)
    with pytest.raises(LimitExceeded, match="RNNSERVE_MAX_TRAIN_STEPS"):
        s.train(10**9).wait()
    # FAILED_PRECONDITION while training.
    stream, _ = start_long_train(s)
    try:
        with pytest.raises(SessionBusy, match="training"):
            s.step()
        with pytest.raises(SessionBusy):
            s.train(5).wait()
        assert s.info().state == pb.SESSION_STATE_TRAINING
        # Other RPCs on this session and others stay responsive meanwhile.
        other = small_session(client, "other")
        started = time.monotonic()
        assert other.step().step == 1
        assert len(s.predict("The quick").predicted) == 9
        assert time.monotonic() - started < 2.0
    finally:
        stream.cancel()
    # Divergence leaves the last good weights: a Train ends with STOP_REASON_DIVERGED, a Step
    # is FAILED_PRECONDITION (not ABORTED, which tells generic clients to retry).
    d = client.create_session(
        TEXT, session_id=new_id("div"), preset="notebook", learning_rate=1e38, seed=1
    )
    d.step()
    final = d.train(50).wait()
    assert final.stop_reason == pb.STOP_REASON_DIVERGED
    assert final.steps_done == 0
    assert d.info().step == 1
    with pytest.raises(TrainingDiverged, match="learning rate is probably too high") as e:
        d.step()
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert e.value.reason == "TRAINING_DIVERGED"
    assert d.info().step == 1
    assert d.predict("The quick").loss > 0


@pytest.mark.timeout(60)
def test_resource_exhausted_by_low_limits(server_factory: ServerFactory) -> None:
    server = server_factory(max_sessions=2, max_corpus_bytes=50)
    with server.client() as client:
        client.create_session("hello world", session_id="one", seq_length=4)
        client.create_session("hello world", session_id="two", seq_length=4)
        with pytest.raises(LimitExceeded, match="--max-sessions"):
            client.create_session("hello world", session_id="three", seq_length=4)
        with pytest.raises(LimitExceeded, match="--max-corpus-bytes"):
            client.session("one").append_text("hello " * 20)
        client.session("two").delete()
        # The limit counts UTF-8 bytes: 30 two-byte characters are 60 bytes, over 50.
        with pytest.raises(LimitExceeded, match="RNNSERVE_MAX_CORPUS_BYTES"):
            client.create_session("éà" * 15, session_id="wide", seq_length=4)
        client.create_session("hello world", session_id="three", seq_length=4)


@pytest.mark.timeout(60)
def test_append_text(client: Client) -> None:
    s = client.create_session("abcdefgh", session_id=new_id("app"), seq_length=4, hidden_size=8)
    r = s.append_text(["abc" * 1000, "defgh" * 1000], chunk_chars=500)
    assert r.appended_chars == 8000 and r.session.corpus_chars == 8008
    with pytest.raises(InvalidArgument, match="alphabet"):
        s.append_text("xyz")
    assert s.info().corpus_chars == 8008  # all or nothing


@pytest.mark.timeout(60)
def test_delete_while_training_ends_stream(module_server: ServerHandle) -> None:
    with module_server.client() as client:
        s = small_session(client, "deltrain")
        stream, _ = start_long_train(s)
        s.delete()
        final = stream.wait()
        assert final.stop_reason == pb.STOP_REASON_DELETED
        with pytest.raises(SessionNotFound):
            s.info()


@pytest.mark.timeout(30)
def test_reflection_lists_the_service(module_server: ServerHandle) -> None:
    with grpc.insecure_channel(module_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=10)))
        names = {s.name for s in response.list_services_response.service}
    assert "rnnserve.v1.RnnService" in names and "grpc.health.v1.Health" in names


@pytest.mark.timeout(60)
def test_shutdown_health_streams_and_exit_code(server: ServerHandle) -> None:
    """SIGTERM: health NOT_SERVING, Train gets a SHUTDOWN final message, watchers end, exit 0."""
    with server.client() as client:
        assert client.health() == "SERVING"
        s = small_session(client, "shut")
        stream, _ = start_long_train(s)
        watch = s.watch_loss(1, retry_for=0)  # the server's end of it, not reconnecting
        assert next(watch).step == 1
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            statuses = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
            server.process.send_signal(signal.SIGTERM)
            assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # (closing the channel ends the health watch, which would otherwise last the grace)
        final = stream.wait()
        assert final.stop_reason == pb.STOP_REASON_SHUTDOWN
        assert final.step >= 5
        list(watch)  # ends without an error
        assert server.wait() == 0
    assert any(e.get("event") == "stopped" for e in server.logs)


def test_an_upload_cut_off_before_its_marked_last_chunk_appends_nothing(
    module_server: ServerHandle,
) -> None:
    """A client that gives up mid-upload cancels the call, and gRPC may hand the server that
    cancel as a plain end of stream (seen as a flaky append of the first chunk): a stream that
    promised a chunk marked last and ended without it must append nothing."""
    with Client(module_server.address) as client:
        client.create_session(TEXT, session_id="cut-upload", hidden_size=8)
    with grpc.insecure_channel(module_server.address) as channel:
        stub = pb_grpc.RnnServiceStub(channel)
        cut = [pb.AppendTextRequest(session_id="cut-upload", text="fine text ", marks_last=True)]
        with pytest.raises(grpc.RpcError) as refused:
            stub.AppendText(iter(cut), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "nothing was appended" in (refused.value.details() or "")
        whole = [*cut, pb.AppendTextRequest(last=True)]
        reply = stub.AppendText(iter(whole), timeout=30)
        assert reply.appended_chars == len("fine text ")
        unmarked = [pb.AppendTextRequest(session_id="cut-upload", text="old client ")]
        assert stub.AppendText(iter(unmarked), timeout=30).appended_chars == len("old client ")
    with Client(module_server.address) as client:
        info = client.session("cut-upload").info()
    assert info.corpus_chars == len(TEXT) + len("fine text ") + len("old client ")
