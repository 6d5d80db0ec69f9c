"""rnnserve.aio.Client against a real server: the sync client's methods as coroutines and
async iterators, with the same errors."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
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


def test_the_aio_client_has_the_sync_clients_methods_and_parameters() -> None:
    """Every public method of rnnserve.Client and rnnserve.Session exists on the asyncio ones
    with the same parameters (names, kinds, defaults)."""
    import inspect

    import rnnserve
    from rnnserve import aio

    for sync_cls, aio_cls in ((rnnserve.Client, aio.Client), (rnnserve.Session, aio.Session)):
        names = [n for n in vars(sync_cls) if not n.startswith("_") and callable(vars(sync_cls)[n])]
        for name in names:
            assert hasattr(aio_cls, name), f"aio.{aio_cls.__name__} lacks {name}"
            want = list(inspect.signature(getattr(sync_cls, name)).parameters.values())
            got = list(inspect.signature(getattr(aio_cls, name)).parameters.values())
            assert [(p.name, p.kind, p.default) for p in got] == [
                (p.name, p.kind, p.default) for p in want
            ], f"{aio_cls.__name__}.{name}"


async def test_update_fork_export_import_and_loss_history(module_server: ServerHandle) -> None:
    async with Client(module_server.address) as client:
        session = await client.create_session(
            TEXT,
            session_id="aio-x",
            hidden_size=8,
            seq_length=8,
            seed=1,
            cell="gru",
            num_layers=2,
            dropout=0.1,
            validation_fraction=0.2,
        )
        info = session.last_info
        assert info is not None and info.config.cell == pb.CELL_GRU
        assert info.config.num_layers == 2 and info.config.dropout == pytest.approx(0.1)
        assert info.config.validation_fraction == pytest.approx(0.2)
        await session.train(10, report_every=5).wait()

        updated = await session.update(learning_rate=0.005, optimizer="adagrad")
        assert updated.config.learning_rate == pytest.approx(0.005)
        assert updated.config.optimizer == pb.OPTIMIZER_ADAGRAD
        assert session.last_info is updated
        with pytest.raises(InvalidArgument):
            await session.update()  # nothing to change: refused before any call

        history = await session.loss_history()
        assert [p.step for p in history] == list(range(1, 11))

        fork = await session.fork("aio-x-fork", clip=2.5)
        assert fork.id == "aio-x-fork" and (await fork.info()).config.clip == pytest.approx(2.5)
        assert (await session.info()).config.clip != pytest.approx(2.5)
        with pytest.raises(SessionExists):
            await session.fork("aio-x-fork")

        chunks = [chunk async for chunk in session.export_stream()]
        data = await session.export()
        assert b"".join(chunks) == data
        copy = await client.import_session(io.BytesIO(data), "aio-x-copy", chunk_bytes=1000)
        assert copy.last_info is not None and copy.last_info.step == 10
        prediction = await session.predict("the quick")
        assert (await copy.predict("the quick")).loss == pytest.approx(prediction.loss)
        with pytest.raises(SessionExists):
            await client.import_session(data)  # the archive's own id is taken


async def test_export_to_a_path_and_import_from_it(
    module_server: ServerHandle, tmp_path: Path
) -> None:
    async with Client(module_server.address) as client:
        session = await client.create_session(TEXT, session_id="aio-file", hidden_size=8)
        path = tmp_path / "model.rnn"
        data = await session.export(path)
        assert path.read_bytes() == data
        copy = await client.import_session(path, "aio-file-copy")
        assert (await copy.info()).corpus_chars == len(TEXT)


async def test_train_stop_conditions_and_sample_options(module_server: ServerHandle) -> None:
    async with Client(module_server.address) as client:
        session = await client.create_session(
            TEXT, session_id="aio-stop", hidden_size=16, seq_length=8, seed=1
        )
        final = await session.train(5000, report_every=50, until_loss=3.0).wait()
        assert final.stop_reason == pb.STOP_REASON_TARGET_LOSS
        sampled = session.train(
            5, report_every=5, sample_length=12, sample_temperature=0.0, sample_prime="the"
        )
        messages = [m async for m in sampled]
        assert messages[-1].stop_reason == pb.STOP_REASON_COMPLETED
        # The prime starts the sample and is included in it.
        assert messages[-1].sample.startswith("the") and len(messages[-1].sample) == 3 + 12


async def test_an_error_reading_an_upload_is_raised_as_itself(
    module_server: ServerHandle,
) -> None:
    def broken() -> Iterator[bytes]:
        yield b"fine text "
        raise OSError("disk went away")

    async with Client(module_server.address) as client:
        session = await client.create_session(TEXT, session_id="aio-broken", hidden_size=8)
        with pytest.raises(OSError, match="disk went away"):
            await session.append_text(broken())
        with pytest.raises(OSError, match="disk went away"):
            await client.import_session(_BrokenFile(), "aio-broken-import")
        assert (await session.info()).corpus_chars == len(TEXT)  # nothing was kept


class _BrokenFile(io.BytesIO):
    def read(self, size: int | None = -1) -> bytes:
        raise OSError("disk went away")


async def test_the_address_defaults_to_rnnserve_address(
    module_server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RNNSERVE_ADDRESS", module_server.address)
    async with Client() as client:
        assert client.address == module_server.address
        assert await client.health() == "SERVING"


async def test_training_jobs_from_asyncio(module_server: ServerHandle) -> None:
    async with Client(module_server.address) as client:
        session = await client.create_session(TEXT, session_id="aio-jobs", hidden_size=8)
        job = await session.start_training(100, report_every=20, request_id="aio-1")
        assert job.name.startswith("sessions/aio-jobs/jobs/")
        steps = [p.step async for p in job.follow()]
        assert steps and steps[-1] == 100
        ended = await job.wait()
        assert ended.state == pb.JOB_STATE_SUCCEEDED and ended.step == 100
        again = await session.start_training(100, request_id="aio-1")
        assert again.name == job.name
        long = await session.start_training(1_000_000)
        assert (await (await session.job()).refresh()).name == long.name
        assert (await long.stop()).stop_reason == pb.STOP_REASON_STOPPED
        assert [j.name for j in await session.jobs()] == [long.name, job.name]
