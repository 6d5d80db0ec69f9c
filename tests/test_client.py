"""The client library against a real server on a free loopback port."""

from __future__ import annotations

import io
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rnnserve import (
    Client,
    InvalidArgument,
    LimitExceeded,
    ServerUnavailable,
    Session,
    SessionBusy,
    SessionExists,
    SessionNotFound,
    Timeout,
    TrainingDiverged,
    Unauthenticated,
)
from rnnserve.client import INLINE_TEXT_CHARS
from rnnserve.v1 import rnn_service_pb2 as pb

from tests.test_auth_tls import make_self_signed

if TYPE_CHECKING:
    from tests.conftest import ServerFactory, ServerHandle

pytestmark = pytest.mark.timeout(60)

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture
def client(module_server: ServerHandle) -> Iterator[Client]:
    with module_server.client(timeout=20) as c:
        yield c


def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds (a state change we cannot be notified of)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def new_session(client: Client, name: str, **config: object) -> Session:
    return client.create_session(TEXT, session_id=name, seed=1, **config)  # type: ignore[arg-type]


def test_hallo_learns_to_predict_the_next_character(client: Client) -> None:
    s = client.create_session(
        "Hallo",
        session_id="hallo",
        preset="notebook",
        hidden_size=100,
        seq_length=5,
        learning_rate=0.1,
        optimizer="sgd",
        seed=0,
    )
    assert s.last_info is not None and s.last_info.config.optimizer == pb.OPTIMIZER_SGD
    losses = [s.step().loss for _ in range(30)]
    assert losses[-1] < losses[0]
    result = s.predict("Hallo")
    assert result.predicted == "alloH"
    assert s.info().step == 30


def test_train_streams_progress_then_a_final_message(client: Client) -> None:
    s = new_session(client, "train-full", hidden_size=32, batch_size=2, seq_length=10)
    messages = list(s.train(40, report_every=10, sample_length=12))
    progress, final = messages[:-1], messages[-1]
    assert [m.steps_done for m in progress] == [10, 20, 30, 40][: len(progress)]
    assert all(len(m.sample) == 12 for m in progress)
    assert all(m.stop_reason == pb.STOP_REASON_UNSPECIFIED for m in progress)
    assert final.stop_reason == pb.STOP_REASON_COMPLETED
    assert final.steps_done == 40 and final.step == 40
    assert s.train(5).wait().step == 45


def test_breaking_out_of_train_cancels_it(client: Client) -> None:
    s = new_session(client, "train-break", hidden_size=32)
    stream = s.train(1_000_000, report_every=1)
    for progress in stream:
        assert progress.steps_done >= 1
        break
    assert stream.done and stream.final is None
    # The server stops between two updates: the session becomes usable again.
    wait_for(lambda: s.info().state == pb.SESSION_STATE_READY)
    step = s.info().step
    assert step < 1_000_000
    assert s.step().step == step + 1


def test_cancel_ends_the_iteration_quietly(client: Client) -> None:
    s = new_session(client, "train-cancel", hidden_size=32)
    seen = []
    with s.train(1_000_000, report_every=1) as stream:
        for progress in stream:
            seen.append(progress.step)
            if len(seen) == 3:
                stream.cancel()  # e.g. from a signal handler or another thread
    assert len(seen) == 3
    wait_for(lambda: s.info().state == pb.SESSION_STATE_READY)


def test_a_second_train_is_refused_while_one_runs(client: Client) -> None:
    s = new_session(client, "busy", hidden_size=32)
    with s.train(1_000_000, report_every=1) as stream:
        next(stream)  # training has started
        with pytest.raises(SessionBusy) as e:
            s.step()
        assert "train" in e.value.details.lower()
        with pytest.raises(SessionBusy):
            next(iter(s.train(10)))


def test_two_watchers_see_the_same_updates_as_a_third_client_trains(
    module_server: ServerHandle, client: Client
) -> None:
    server = module_server
    s = new_session(client, "watched", hidden_size=32)
    s.step()  # history before the watchers start
    steps = 25
    results: list[list[tuple[int, float]]] = [[], []]
    started = threading.Barrier(3)

    def watch(index: int) -> None:
        with Client(server.address) as own:
            stream = own.session("watched").watch_loss(from_step=1)
            first = next(stream)
            results[index].append((first.step, first.loss))
            started.wait()
            for point in stream:
                results[index].append((point.step, point.loss))
                if point.step == 1 + steps:
                    break

    threads = [threading.Thread(target=watch, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    started.wait(timeout=20)
    with Client(server.address) as trainer:
        final = trainer.session("watched").train(steps, report_every=5).wait()
    for t in threads:
        t.join(timeout=30)
    assert final.step == 1 + steps
    assert results[0] == results[1]
    assert [step for step, _ in results[0]] == list(range(1, steps + 2))


def test_generate_is_reproducible_for_a_seed(client: Client) -> None:
    s = new_session(client, "gen", hidden_size=32)
    s.train(20).wait()
    a = s.generate(300, prime="The ", temperature=0.8, top_k=5, seed=7)
    b = "".join(s.generate_stream(300, prime="The ", temperature=0.8, top_k=5, seed=7))
    assert a == b and len(a) == 300
    assert set(a) <= set(TEXT)
    assert s.generate(300, prime="The ", seed=8) != s.generate(300, prime="The ", seed=9)
    greedy = s.generate(50, temperature=0.0)
    assert greedy == s.generate(50, temperature=0.0, seed=123)


def test_append_text_from_a_file_an_iterable_and_past_the_message_limit(client: Client) -> None:
    s = new_session(client, "append", hidden_size=32)
    before = s.info().corpus_chars
    r = s.append_text(io.StringIO(TEXT), chunk_chars=100)
    assert r.appended_chars == len(TEXT)
    r = s.append_text(iter(["the ", "lazy ", "dog"]))
    assert r.appended_chars == len("the lazy dog")
    big = "brown fox " * 500_000  # 5 MB: more than the 4 MiB message limit
    r = s.append_text(big)
    assert r.appended_chars == len(big)
    assert s.info().corpus_chars == before + len(TEXT) + len("the lazy dog") + len(big)
    with pytest.raises(InvalidArgument):
        s.append_text("only in the corpus alphabet: \u2603")


def test_a_read_error_in_append_is_raised_as_itself(client: Client) -> None:
    s = new_session(client, "append-error", hidden_size=32)

    def chunks() -> Iterator[str]:
        yield "fox "
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        s.append_text(chunks())


def test_create_sends_long_texts_in_chunks(client: Client) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(INLINE_TEXT_CHARS * 2 + 17))
    text += "Z"  # a character first seen after the inline part
    s = client.create_session(text, session_id="long", hidden_size=16)
    info = s.info()
    assert info.corpus_chars == len(text)
    assert info.alphabet == "".join(sorted(set(text)))


def test_list_sessions_walks_every_page(client: Client) -> None:
    ids = [f"page-{i:02d}" for i in range(23)]
    for i in ids:
        client.create_session(TEXT, session_id=i, hidden_size=8)
    listed = [s.session_id for s in client.list_sessions(page_size=5)]
    assert listed == sorted(listed)
    assert set(ids) <= set(listed)
    assert len(listed) == len(set(listed))


def test_status_codes_become_typed_errors(client: Client) -> None:
    with pytest.raises(SessionNotFound) as not_found:
        client.session("no-such-session").info()
    assert "no-such-session" in not_found.value.details
    new_session(client, "taken", hidden_size=8)
    with pytest.raises(SessionExists):
        new_session(client, "taken", hidden_size=8)
    with pytest.raises(InvalidArgument) as bad:
        client.create_session(TEXT, hidden_size=-3)
    assert "hidden_size" in bad.value.details
    with pytest.raises(InvalidArgument):
        client.create_session(TEXT, session_id="../escape")
    with pytest.raises(SessionNotFound):
        list(client.session("no-such-session").generate_stream(10))
    with pytest.raises(SessionNotFound):
        client.session("no-such-session").delete()


def test_divergence_is_reported_and_the_update_not_applied(client: Client) -> None:
    s = new_session(client, "diverge", preset="notebook", learning_rate=1e38)
    with pytest.raises(TrainingDiverged) as e:
        for _ in range(20):
            s.step()
    assert "learning rate" in e.value.details
    info = s.info()
    assert info.state == pb.SESSION_STATE_READY
    loss = s.predict(TEXT[:20]).loss
    assert not math.isnan(loss)  # the last good weights were kept


def test_delete(client: Client) -> None:
    s = new_session(client, "doomed", hidden_size=8)
    s.delete()
    with pytest.raises(SessionNotFound):
        s.info()


def test_timeouts_and_unreachable_servers(module_server: ServerHandle) -> None:
    server = module_server
    with server.client() as c:
        s = new_session(c, "idle", hidden_size=8)
        # Nobody trains it: a live watch waits past its deadline.
        with pytest.raises(Timeout) as e:
            list(s.watch_loss(from_step=1, timeout=0.5))
        assert e.value.code_name == "DEADLINE_EXCEEDED"
    with Client("127.0.0.1:1", timeout=5) as c:
        with pytest.raises(ServerUnavailable):
            c.session("x").info()
        with pytest.raises(ServerUnavailable):
            c.health()
        with pytest.raises(Timeout):
            c.wait_ready(0.3)


def test_health(client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("rnnserve.v1.RnnService") in {"SERVING", "SERVICE_UNKNOWN"}
    assert client.health("no.such.Service") == "SERVICE_UNKNOWN"
    client.wait_ready(5)


def test_limits_and_auth(server_factory: ServerFactory) -> None:
    server = server_factory(max_sessions=1, auth_token="s3cret")
    with Client(server.address, token="") as anonymous:
        assert anonymous.health() == "SERVING"  # health needs no token
        with pytest.raises(Unauthenticated):
            list(anonymous.list_sessions())
    with Client(server.address, token="wrong") as wrong, pytest.raises(Unauthenticated):
        wrong.create_session(TEXT)
    with Client(server.address, token="s3cret") as c:
        new_session(c, "one", hidden_size=8)
        with pytest.raises(LimitExceeded) as e:
            new_session(c, "two", hidden_size=8)
        assert "max" in e.value.details.lower()


def test_tls_with_a_ca_file(tmp_path: Path, server_factory: ServerFactory) -> None:
    cert, key = make_self_signed(tmp_path)  # with cryptography: no openssl to be missing
    server = server_factory(tls_cert=cert, tls_key=key)
    with server.client(ca_file=cert, timeout=10) as c:
        assert c.health() == "SERVING"
        assert new_session(c, "secure", hidden_size=8).info().session_id == "secure"
    with server.client(timeout=3) as plaintext, pytest.raises(ServerUnavailable):
        plaintext.health()
