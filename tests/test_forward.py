"""Forwarding calls as bytes to an owner replica: a grpc.aio proxy built from the cluster
forwarder in front of a real rnnserve server, driven by the real client library."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import pytest
from rnnserve import Client, SessionBusy, SessionNotFound, Timeout, Unauthenticated
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve_server.cluster.forward import Forwarder, method_kinds, proxy_handler

if TYPE_CHECKING:
    from tests.conftest import ServerFactory, ServerHandle

pytestmark = pytest.mark.timeout(90)

TEXT = "the cat sat on the mat. " * 50
TOKEN = "forward-token"


async def start_proxy(owner: str) -> tuple[grpc.aio.Server, Forwarder, str]:
    forwarder = Forwarder()
    server = grpc.aio.server()
    kinds = method_kinds(pb.DESCRIPTOR.services_by_name["RnnService"])
    server.add_generic_rpc_handlers([proxy_handler(forwarder, kinds, owner)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, forwarder, f"127.0.0.1:{port}"


@pytest.fixture
async def owner(server_factory: ServerFactory) -> ServerHandle:
    return server_factory(auth_token=TOKEN)


@pytest.fixture
async def proxy(owner: ServerHandle) -> AsyncIterator[tuple[str, Forwarder]]:
    server, forwarder, address = await start_proxy(owner.address)
    yield address, forwarder
    await server.stop(None)
    await forwarder.close()


def client_for(address: str, **kwargs: Any) -> Client:
    kwargs.setdefault("timeout", 30.0)
    return Client(address, token=TOKEN, **kwargs)


async def test_all_call_kinds_pass_through(
    owner: ServerHandle, proxy: tuple[str, Forwarder]
) -> None:
    address, forwarder = proxy

    def flow() -> tuple[int, int, str, int]:
        with client_for(address) as client:
            session = client.create_session(TEXT, session_id="fw", hidden_size=16, seed=2)
            final = session.train(20, report_every=5).wait()  # server stream
            step = session.step().step  # unary
            appended = session.append_text("the mat sat. " * 20)  # client stream
            text = session.generate(40, prime="the", seed=1)  # server stream
            return final.step, step, text, appended.appended_chars

    final_step, step, text, appended_chars = await asyncio.to_thread(flow)
    assert (final_step, step, len(text)) == (20, 21, 40)
    assert appended_chars == len("the mat sat. ") * 20
    assert forwarder.forwards >= 5

    def direct() -> int:
        with client_for(owner.address) as client:
            return int(client.session("fw").info().step)

    assert await asyncio.to_thread(direct) == 21  # the owner did the work


async def test_errors_auth_and_deadlines_are_carried(proxy: tuple[str, Forwarder]) -> None:
    address, _ = proxy

    def missing() -> None:
        with client_for(address) as client:
            client.session("nope").info()

    with pytest.raises(SessionNotFound, match="nope"):
        await asyncio.to_thread(missing)

    def no_token() -> None:
        with Client(address, timeout=30.0) as client:
            list(client.list_sessions())

    with pytest.raises(Unauthenticated):  # the owner checked the forwarded metadata
        await asyncio.to_thread(no_token)

    def short_deadline() -> None:
        with client_for(address) as client:
            session = client.create_session(TEXT, session_id="slow", hidden_size=64)
            session.train(1_000_000, timeout=1.0).wait()

    with pytest.raises(Timeout):
        await asyncio.to_thread(short_deadline)


async def test_cancelling_through_the_proxy_stops_the_owner(
    proxy: tuple[str, Forwarder],
) -> None:
    address, _ = proxy

    def cancel_then_step() -> int:
        with client_for(address) as client:
            session = client.create_session(TEXT, session_id="cancel", hidden_size=16)
            stream = session.train(1_000_000, report_every=1)
            for progress in stream:
                if progress.step >= 3:
                    break  # cancels the call: proxy -> owner
            # The owner's Train ends: the session takes a Step again (SessionBusy until then).
            deadline = time.monotonic() + 30
            while True:
                try:
                    return int(session.step().step)
                except SessionBusy:
                    if time.monotonic() > deadline:
                        raise AssertionError("the owner kept training after the cancel") from None
                    time.sleep(0.05)  # poll interval; the loop re-checks the condition

    assert await asyncio.to_thread(cancel_then_step) > 3
