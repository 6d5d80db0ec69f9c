"""Retries in the client. gRPC's own retry policy: a call that changes nothing survives a
transient UNAVAILABLE (a connection the server side drops before answering); one that changes
a session is never sent twice. The library's, by idempotency: a Train toward ``until_step``
(``train_to``, sync and asyncio) survives its connection being cut mid-call; one without it
raises ConnectionLost naming the step to retry toward."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from typing import TYPE_CHECKING

import pytest
from rnnserve import Client, ConnectionLost, ServerUnavailable, aio
from rnnserve._train_to import TrainToResult, TrainToRun
from rnnserve.v1 import rnn_service_pb2 as pb

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

pytestmark = pytest.mark.timeout(60)

# Reconnect at once after the dropped connection (gRPC waits 1 s by default), so the retry
# finds a working connection well within its backoff.
FAST_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 100),
]


class FlakyProxy:
    """A loopback TCP proxy to ``target`` that drops its first ``drop`` connections at once
    (the client sees UNAVAILABLE, as from a server restarting) and forwards later ones."""

    def __init__(self, target: str, drop: int = 1) -> None:
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._drop = drop
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            self.connections += 1
            if self.connections <= self._drop:
                conn.close()
                continue
            upstream = socket.create_connection(self._target)
            self._sockets += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Break every connection made so far (calls on them are cut off mid-call)."""
        for s in self._sockets[1:]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for s in self._sockets:
            s.close()


def test_read_calls_survive_a_dropped_connection(module_server: ServerHandle) -> None:
    with module_server.client() as setup:
        setup.create_session("retry me " * 20, session_id="retry-read", hidden_size=8)
    for call in ("info", "list", "predict", "health", "seeded_generate"):
        proxy = FlakyProxy(module_server.address)
        try:
            with Client(proxy.address, timeout=20, options=FAST_RECONNECT) as client:
                session = client.session("retry-read")
                if call == "info":
                    assert session.info().session_id == "retry-read"
                elif call == "list":
                    assert "retry-read" in {s.session_id for s in client.list_sessions()}
                elif call == "predict":
                    assert len(session.predict("retry").predicted) == 5
                elif call == "health":
                    assert client.health() == "SERVING"
                else:
                    assert len(session.generate(10, seed=3)) == 10
            assert proxy.connections >= 2, call  # the first attempt met the dropped connection
        finally:
            proxy.close()


def test_calls_that_change_a_session_are_not_retried(module_server: ServerHandle) -> None:
    with module_server.client() as setup:
        setup.create_session("step once " * 20, session_id="retry-step", hidden_size=8)
    for call in ("step", "unseeded_generate"):
        proxy = FlakyProxy(module_server.address)
        try:
            with Client(proxy.address, timeout=20, options=FAST_RECONNECT) as client:
                session = client.session("retry-step")
                with pytest.raises(ServerUnavailable):
                    if call == "step":
                        session.step()
                    else:
                        session.generate(10)
        finally:
            proxy.close()
    with module_server.client() as check:
        assert check.session("retry-step").info().step == 0  # no Step reached the server


@pytest.mark.parametrize("flavour", ["sync", "aio"])
def test_train_to_survives_a_connection_cut_mid_train(
    module_server: ServerHandle, flavour: str
) -> None:
    session_id = f"retry-cut-{flavour}"
    with module_server.client() as setup:
        # The tanh RNN: 2000 cheap updates (the GRU default takes several times as long).
        setup.create_session(
            "cut me off " * 40,
            session_id=session_id,
            cell="rnn",
            num_layers=1,
            hidden_size=16,
            seed=1,
        )
    proxy = FlakyProxy(module_server.address, drop=0)
    target = 2000
    cut_at: list[int] = []

    def cut_once(message: pb.TrainResponse) -> None:
        if not cut_at:
            cut_at.append(message.step)
            proxy.cut()

    async def train_aio() -> TrainToResult:
        async with aio.Client(proxy.address, timeout=20, options=FAST_RECONNECT) as client:
            return await client.session(session_id).train_to(
                target, report_every=10, on_progress=cut_once
            )

    try:
        if flavour == "aio":
            result = asyncio.run(train_aio())
        else:
            with Client(proxy.address, timeout=20, options=FAST_RECONNECT) as client:
                result = client.session(session_id).train_to(
                    target, report_every=10, on_progress=cut_once
                )
    finally:
        proxy.close()
    assert cut_at and cut_at[0] < target
    assert result.final is not None and result.final.step == target
    assert result.final.stop_reason == pb.STOP_REASON_COMPLETED
    assert result.retries >= 1 and result.rollbacks == []  # one server: nothing lost
    with module_server.client() as check:
        assert check.session(session_id).info().step == target


def test_a_train_without_until_step_cut_off_raises_connection_lost(
    module_server: ServerHandle,
) -> None:
    with module_server.client() as setup:
        setup.create_session("cut me off " * 40, session_id="retry-lost", hidden_size=16)
    proxy = FlakyProxy(module_server.address, drop=0)
    try:
        with Client(proxy.address, timeout=20) as client:
            stream = client.session("retry-lost").train(10**6, report_every=10)
            first = next(stream)
            proxy.cut()
            with pytest.raises(ConnectionLost) as lost:
                stream.wait()
    finally:
        proxy.close()
    target = first.step - first.steps_done + 10**6
    assert lost.value.target_step == target
    assert str(lost.value).startswith(
        "the connection to the replica was lost mid-call; the session may have been updated; "
        f"retry with until_step={target}"
    )


def test_train_to_reports_each_rollback_once_and_where_its_train_started() -> None:
    """``train_to``'s rollbacks from what the server answers each try (GetSession's step, then
    the Train's messages): a cluster's failover is reported once, at the step the session went
    back to; and a restore that GetSession did not see (done by the replica that ran the Train,
    after GetSession answered elsewhere) is reported from the Train's own first message."""
    run = TrainToRun(60.0, None, None, None)

    def message(step: int, steps_done: int) -> pb.TrainResponse:
        return pb.TrainResponse(step=step, steps_done=steps_done)

    run.started(1)
    run.progress(message(101, 100))  # then the owner dies: steps 42..101 were not checkpointed
    run.started(41)  # the next try finds the session restored at its checkpoint
    run.progress(message(61, 20))
    assert run.result.rollbacks == [(101, 41)]
    # Cut off again (a drain, a proxy's reset) before it trained past 101: nothing was lost.
    run.started(61)
    run.progress(message(81, 20))
    assert run.result.rollbacks == [(101, 41)]
    # GetSession said 81, but the Train ran where the session was restored at 71.
    run.started(81)
    run.progress(message(91, 20))
    assert run.result.rollbacks == [(101, 41), (81, 71)]
