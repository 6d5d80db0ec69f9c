"""rnnserve.aio.Client against a real server: the sync client's methods as coroutines and
async iterators, with the same errors."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import pytest
from rnnserve import (
    InvalidArgument,
    ServerUnavailable,
    SessionExists,
    SessionNotFound,
    Timeout,
)
from rnnserve.aio import Client
from rnnserve.v1 import rnn_service_pb2 as pb

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

pytestmark = pytest.mark.timeout(90)

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


async def test_a_session_from_create_to_delete(module_server: ServerHandle) -> None:
    async with Client(module_server.address) as client:
        await client.wait_ready(10)
        assert await client.health() == "SERVING"
        assert await client.health("no.such.Service") == "SERVICE_UNKNOWN"
        session = await client.create_session(
            TEXT, session_id="aio-1", hidden_size=16, seq_length=8, seed=1, optimizer="adam"
        )
        assert session.last_info is not None and session.last_info.config.hidden_size == 16
        step = await session.step()
        assert step.step == 1 and step.loss > 0
        train = session.train(20, report_every=5)
        progress = [message async for message in train]
        assert [p.step for p in progress] == [6, 11, 16, 21]
        assert train.final is progress[-1]
        assert progress[-1].stop_reason == pb.STOP_REASON_COMPLETED
        prediction = await session.predict("the quick")
        assert len(prediction.predicted) == len("the quick")
        first = await session.generate(40, prime="t", seed=5)
        assert len(first) == 40
        assert await session.generate(40, prime="t", seed=5) == first  # same seed, same text
        chunks = [chunk async for chunk in session.generate_stream(30, seed=2)]
        assert len("".join(chunks)) == 30
        appended = await session.append_text(io.BytesIO(b"over the fox " * 10), 7)
        assert appended.session.corpus_chars == len(TEXT) + 130
        points = []
        async with session.watch_loss(from_step=1) as watch:
            async for point in watch:
                points.append(point.step)
                if point.step == 21:
                    break
        assert points == list(range(1, 22))
        ids = [s.session_id async for s in client.list_sessions(page_size=1)]
        assert "aio-1" in ids
        info = await client.session("aio-1").info()
        assert info.step == 21
        await session.delete()
        with pytest.raises(SessionNotFound):
            await session.info()


async def test_errors_are_the_sync_clients(module_server: ServerHandle) -> None:
    async with Client(module_server.address) as client:
        await client.create_session(TEXT, session_id="aio-err", hidden_size=8)
        with pytest.raises(SessionExists):
            await client.create_session(TEXT, session_id="aio-err", hidden_size=8)
        with pytest.raises(InvalidArgument) as e:
            await client.create_session(TEXT, hidden_size=0)
        assert "hidden_size" in e.value.details
        with pytest.raises(InvalidArgument):
            await client.create_session(TEXT, preset="huge")  # refused before any call
        with pytest.raises(SessionNotFound):
            async for _ in client.session("nope").train(5):
                pass
        with pytest.raises(SessionNotFound):
            await client.session("nope").generate(5)
        # A watch nobody feeds ends at its deadline.
        with pytest.raises(Timeout):
            async for _ in client.session("aio-err").watch_loss(timeout=0.5):
                pass
        with pytest.raises(UnicodeDecodeError):  # a bad source is raised as itself
            await client.session("aio-err").append_text(b"\xff\xfe")
    async with Client("127.0.0.1:1", timeout=5) as dead:
        with pytest.raises(ServerUnavailable):
            await dead.session("x").info()
        with pytest.raises(Timeout):
            await dead.wait_ready(0.3)


async def test_cancelling_a_train_stream_stops_it(module_server: ServerHandle) -> None:
    async with Client(module_server.address) as client:
        session = await client.create_session(TEXT, session_id="aio-cancel", hidden_size=8)
        train = session.train(1_000_000, report_every=1)
        first = await train.__anext__()
        assert first.step >= 1
        train.cancel()
        assert [m async for m in train] == []
        assert train.done and train.final is None
        # The server stops between two updates and the session is usable again.
        for _ in range(200):
            info = await session.info()
            if info.state == pb.SESSION_STATE_READY:
                break
            await client.wait_ready(5)  # one round trip, not a sleep
        assert info.state == pb.SESSION_STATE_READY
        assert (await session.step()).step > first.step
