"""Answers that must stay right when calls race or a part of the cluster fails: concurrent
deletes of one id, concurrent creations of one new id on two replicas, ListSessions with an
owner gone, Steps on an owner while Redis is frozen, and a Redis that restarts empty.

Real redis-server and rnnserve-server processes, as in test_cluster.py."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rnnserve import Client, RnnServeError, ServerUnavailable, SessionExists, SessionNotFound
from rnnserve.client import Session
from rnnserve.v1 import rnn_service_pb2 as pb

from tests.test_cluster import TEXT, free_loopback_port, start_replicas, wait_until

if TYPE_CHECKING:
    from tests.cluster_fixtures import RedisFactory, RedisProcess
    from tests.conftest import ServerFactory, ServerHandle

pytestmark = pytest.mark.timeout(180)


def race(calls: list[Callable[[], object]]) -> list[object]:
    """Run the calls at once (each in its own thread, released together); each one's result,
    or the RnnServeError it raised."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], object]) -> object:
        barrier.wait(30)
        try:
            return call()
        except RnnServeError as exc:
            return exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def concurrent_deletes(replicas: list[ServerHandle], count: int = 20) -> list[object]:
    """``count`` DeleteSession calls of one session at once, spread over the replicas."""
    with replicas[0].client() as client:
        client.create_session(TEXT, session_id="gone", hidden_size=16, seed=1)
    clients = [replicas[i % len(replicas)].client() for i in range(count)]
    try:
        return race([client.session("gone").delete for client in clients])
    finally:
        for client in clients:
            client.close()


def assert_one_delete_won(results: list[object]) -> None:
    winners = [r for r in results if r is None]
    losers = [r for r in results if r is not None]
    assert len(winners) == 1, results
    assert all(isinstance(r, SessionNotFound) for r in losers), losers


def test_concurrent_deletes_of_one_id_one_succeeds(server_factory: ServerFactory) -> None:
    server = server_factory()
    assert_one_delete_won(concurrent_deletes([server]))
    with server.client() as client:
        assert list(client.list_sessions()) == []


def test_concurrent_deletes_of_one_id_on_a_cluster_one_succeeds(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    replicas = start_replicas(server_factory, redis_server, tmp_path / "shared", count=2)
    assert_one_delete_won(concurrent_deletes(replicas))
    with replicas[1].client() as client:
        assert list(client.list_sessions()) == []


def make_one_id_twice(
    kind: str, replicas: list[ServerHandle], clients: list[Client], new_id: str
) -> list[object]:
    """Two replicas making session ``new_id`` at once, by ``kind``: "fork_vs_create" (a fork
    of "src", owned by replica 0, there; a CreateSession on replica 1) or "import_twice" (an
    archive of ``new_id`` imported under its own id on both)."""
    first, second = clients
    if kind == "fork_vs_create":
        return race(
            [
                lambda: first.session("src").fork(new_id),
                lambda: second.create_session(TEXT, session_id=new_id, hidden_size=16, seed=3),
            ]
        )
    template = first.session("src").fork(new_id)
    archive = template.export()
    template.delete()
    return race([lambda: first.import_session(archive), lambda: second.import_session(archive)])


@pytest.mark.parametrize("kind", ["fork_vs_create", "import_twice"])
def test_two_replicas_making_one_new_id_at_once_one_wins_the_other_already_exists(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path, kind: str
) -> None:
    replicas = start_replicas(server_factory, redis_server, tmp_path / "shared", count=2)
    clients = [replica.client() for replica in replicas]
    try:
        clients[0].create_session(TEXT, session_id="src", hidden_size=16, seed=1)
        assert clients[0].session("src").step().step == 1  # replica 0 holds its lease
        for trial in range(8):
            new_id = f"new{trial}"
            results = make_one_id_twice(kind, replicas, clients, new_id)
            won = [i for i, r in enumerate(results) if not isinstance(r, RnnServeError)]
            assert len(won) == 1, (trial, results)
            (lost,) = [r for r in results if isinstance(r, RnnServeError)]
            assert isinstance(lost, SessionExists), (trial, lost)
            assert lost.metadata.get("session_id") == new_id
            # The winner's replica serves the session it made, and so does the other one.
            winner = clients[won[0]]
            step = winner.session(new_id).info().step
            assert winner.session(new_id).step().step == step + 1, trial
            assert clients[1 - won[0]].session(new_id).step().step == step + 2, trial
        listed = [s.session_id for s in clients[1].list_sessions()]
        assert listed == [f"new{trial}" for trial in range(8)] + ["src"]
        # A lost race is not a storage failure: both replicas stay SERVING.
        assert [client.health() for client in clients] == ["SERVING", "SERVING"]
    finally:
        for client in clients:
            client.close()


def test_list_sessions_answers_with_an_unreachable_owner_marked(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    # Leases far longer than the test: the dead replica's session stays owned by it.
    shared = tmp_path / "shared"
    doomed, lister = start_replicas(server_factory, redis_server, shared, count=2, lease_ttl=60)
    astray = server_factory(  # advertises an address where nothing listens
        redis_url=redis_server.url,
        shared_dir=shared,
        lease_ttl=60,
        advertise_address=f"127.0.0.1:{free_loopback_port()}",
    )
    for replica, session_id in ((doomed, "dead"), (astray, "astray"), (lister, "kept")):
        with replica.client() as client:
            client.create_session(TEXT, session_id=session_id, hidden_size=16, seed=1)
            assert client.session(session_id).step().step == 1  # held by `replica`
    doomed.kill()  # kill -9: its lease stays in Redis until it expires
    with lister.client(timeout=20) as client:
        listed = {s.session_id: s for s in client.list_sessions()}
        assert sorted(listed) == ["astray", "dead", "kept"]
        assert listed["kept"].state == pb.SESSION_STATE_READY and listed["kept"].step == 1
        for session_id in ("astray", "dead"):
            entry = listed[session_id]
            assert entry.state == pb.SESSION_STATE_OWNER_UNREACHABLE, entry
            assert "owner" in entry.error and "127.0.0.1" not in entry.error, entry.error
        paged = [s.session_id for s in client.list_sessions(page_size=2)]
        assert paged == ["astray", "dead", "kept"]


@pytest.mark.parametrize("lease_ttl", [2.0, 30.0])
def test_steps_on_the_owner_are_refused_while_redis_is_frozen(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path, lease_ttl: float
) -> None:
    """A SIGSTOPped Redis (connections hang, nothing is refused) past the lease TTL, and
    shorter than it."""
    (owner,) = start_replicas(
        server_factory, redis_server, tmp_path / "shared", count=1, lease_ttl=lease_ttl
    )
    assert redis_server.process is not None
    with owner.client(timeout=60) as client:  # a deadline far past any timeout of the server's
        session = client.create_session(TEXT, session_id="own", hidden_size=16, seed=1)
        assert session.step().step == 1
        wait_checkpointed(session, 1)
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            # Write-behind Steps go on until their checkpoint fails, then the owner refuses
            # them with a sentence, never stalling them until the caller's deadline.
            refusals: list[ServerUnavailable] = []
            acknowledged = 0
            while len(refusals) < 2:
                try:
                    session.step()
                    acknowledged += 1
                except ServerUnavailable as exc:
                    refusals.append(exc)
                assert acknowledged < 100_000
            assert all("Redis" in str(exc) for exc in refusals), refusals
            wait_until(lambda: client.health(timeout=5) == "NOT_SERVING", what="NOT_SERVING")
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        # SERVING again without any call: the refused checkpoints go through by themselves.
        wait_until(lambda: client.health(timeout=5) == "SERVING", timeout=20, what="SERVING")
        step = session.step().step
    if lease_ttl > 10:  # the lease outlived the freeze: nothing acknowledged was lost
        assert step == 1 + acknowledged + 1
    else:  # it lapsed: the session came back from its last checkpoint, as after a crash
        assert 2 <= step <= 1 + acknowledged + 1


def wait_checkpointed(session: Session, step: int) -> None:
    """Until the session's checkpoint on the shared directory is at ``step``."""
    wait_until(lambda: session.info().checkpointed_step == step, what=f"step {step} saved")


def blob_tokens(shared: Path, session_id: str) -> list[int]:
    """The tokens in the names of the session's checkpoint blobs on the shared directory."""
    return sorted(int(p.name.split("-")[0]) for p in (shared / session_id).glob("*.npz"))


def test_redis_restarted_without_its_data_gets_the_directory_back_from_the_shared_one(
    server_factory: ServerFactory, redis_factory: RedisFactory, tmp_path: Path
) -> None:
    redis = redis_factory("--appendonly", "no")  # a restart forgets everything
    shared = tmp_path / "shared"
    replicas = start_replicas(server_factory, redis, shared, count=2)
    for replica in replicas:  # one line at start says what a restart would lose
        warning = replica.wait_for_log("redis_appendonly_off")
        assert "appendonly yes" in warning["error"]
    ids = ["kept0", "kept1"]
    with replicas[0].client() as client:
        for session_id in ids:
            session = client.create_session(TEXT, session_id=session_id, hidden_size=16, seed=1)
            assert session.step().step == 1
            wait_checkpointed(session, 1)
    old_tokens = {session_id: max(blob_tokens(shared, session_id)) for session_id in ids}
    mark = replicas[0].mark()
    redis.restart()  # SIGTERM, start again: empty
    for session_id in ids:  # the owner finds its leases gone
        replicas[0].wait_for_log("lease_lost", start=mark, session_id=session_id)
    with replicas[1].client() as client:
        listed = {s.session_id: s.step for s in client.list_sessions()}
        assert listed == {"kept0": 1, "kept1": 1}
        with pytest.raises(SessionExists):
            client.create_session(TEXT, session_id="kept0", hidden_size=16, seed=2)
        for session_id in ids:
            session = client.session(session_id)
            assert session.step().step == 2  # from its checkpoint, under a new token
            wait_checkpointed(session, 2)
            # A token never goes backwards: the new blobs' are above every old one.
            assert min(blob_tokens(shared, session_id)) > old_tokens[session_id]
    rebuilt = [e for r in replicas for e in r.logs if e.get("event") == "directory_rebuilt"]
    assert [e["sessions"] for e in rebuilt if e["sessions"]] == [2]  # by one replica


def test_a_redis_that_forbids_config_is_reported_unchecked(
    server_factory: ServerFactory, redis_factory: RedisFactory, tmp_path: Path
) -> None:
    redis = redis_factory("--rename-command", "CONFIG", "")  # as managed Redis services do
    (replica,) = start_replicas(server_factory, redis, tmp_path / "shared", count=1)
    warning = replica.wait_for_log("redis_appendonly_unknown")
    assert "could not check" in warning["error"]
    with replica.client() as client:
        assert client.create_session(TEXT, session_id="x", hidden_size=8).step().step == 1
