"""Cluster mode end to end: a real redis-server, three real rnnserve-server replicas on
loopback ports sharing one checkpoint directory, and (for one test) nginx in front.

Every replica accepts every call: a session owned elsewhere is forwarded to its owner, one
owned by no one is activated from its latest shared checkpoint."""

from __future__ import annotations

import random
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rnnserve import Client, RnnServeError, ServerUnavailable
from rnnserve.v1 import rnn_service_pb2 as pb

if TYPE_CHECKING:
    from tests.cluster_fixtures import NginxFactory, RedisProcess
    from tests.conftest import ServerFactory, ServerHandle

pytestmark = pytest.mark.timeout(180)

TEXT = "the quick brown fox jumps over the lazy dog. " * 20


def start_replicas(
    server_factory: ServerFactory,
    redis: RedisProcess,
    shared: Path,
    count: int = 3,
    **settings: Any,
) -> list[ServerHandle]:
    """``count`` replicas on one Redis and one shared directory."""
    settings.setdefault("lease_ttl", 2)
    return [
        server_factory(redis_url=redis.url, shared_dir=shared, **settings) for _ in range(count)
    ]


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll ``condition`` until true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    event = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        event.wait(0.05)


def test_any_replica_serves_any_session(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    replicas = start_replicas(server_factory, redis_server, tmp_path / "shared")
    clients = [r.client() for r in replicas]
    try:
        created = clients[0].create_session(TEXT, session_id="one", hidden_size=16, seed=1)
        assert created.info().step == 0
        for i, client in enumerate(clients * 2):
            reply = client.session("one").step()
            assert reply.step == i + 1
        final = clients[2].session("one").train(10, report_every=5).wait()
        assert final.step == 16
        assert [s.session_id for s in clients[1].list_sessions()] == ["one"]
        assert len(clients[1].session("one").generate(20, prime="the", seed=2)) == 20
        clients[2].session("one").append_text("more text here. " * 10)
        assert clients[0].session("one").info().step == 16
        clients[1].session("one").delete()
        assert list(clients[2].list_sessions()) == []
    finally:
        for client in clients:
            client.close()


def test_sigterm_drains_without_losing_steps(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    replicas = start_replicas(server_factory, redis_server, tmp_path / "shared")
    with replicas[0].client() as first:
        for i in range(3):
            session = first.create_session(TEXT, session_id=f"d{i}", hidden_size=16, seed=i)
            assert session.step().step == 1  # owned by replica 0 now
    assert replicas[0].stop(signal.SIGTERM) == 0
    with replicas[1].client() as other:
        for i in range(3):
            assert other.session(f"d{i}").step().step == 2  # 0 steps lost


def test_unique_ownership_under_concurrent_steps(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    replicas = start_replicas(server_factory, redis_server, tmp_path / "shared")
    ids = [f"u{i:02d}" for i in range(30)]
    with replicas[0].client() as client:
        for i, session_id in enumerate(ids):
            # Created through every replica in turn: owners spread over the three.
            with replicas[i % 3].client() as creator:
                creator.create_session(TEXT, session_id=session_id, hidden_size=8, seed=i)
    done: dict[str, int] = dict.fromkeys(ids, 0)
    lock = threading.Lock()
    failures: list[BaseException] = []

    def stepper(replica: ServerHandle, order: list[str]) -> None:
        try:
            with replica.client() as client:
                for _ in range(2):
                    for session_id in order:
                        try:
                            client.session(session_id).step()
                        except RnnServeError as exc:
                            if "busy" not in str(exc) and "training" not in str(exc):
                                raise
                            continue  # a concurrent Step on the same session: refused, not lost
                        with lock:
                            done[session_id] += 1
        except BaseException as exc:  # handed to the test thread
            failures.append(exc)

    threads = [
        threading.Thread(target=stepper, args=(replica, ids[k * 10 :] + ids[: k * 10]))
        for k, replica in enumerate(replicas)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures
    with replicas[1].client() as client:
        steps = {s.session_id: s.step for s in client.list_sessions(page_size=100)}
    assert steps == done  # every acknowledged Step counted exactly once
    assert sum(done.values()) >= 30
    # Each session was activated by one replica only: its lease holder served every call.
    activated: dict[str, int] = {}
    for replica in replicas:
        for entry in replica.logs:
            if entry.get("event") == "session_activated":
                sid = str(entry["session_id"])
                activated[sid] = activated.get(sid, 0) + 1
    assert all(count == 1 for count in activated.values()), activated


def test_sigterm_during_trains_loses_no_step(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    replicas = start_replicas(server_factory, redis_server, tmp_path / "shared")
    ids = ["t0", "t1"]
    with replicas[0].client(timeout=None) as owner:
        streams = []
        for i, session_id in enumerate(ids):
            owner.create_session(TEXT, session_id=session_id, hidden_size=16, seed=i)
            streams.append(owner.session(session_id).train(1_000_000, report_every=1))
        for stream in streams:
            assert next(stream).step >= 1
        replicas[0].process.send_signal(signal.SIGTERM)
        finals = [stream.wait() for stream in streams]
        assert [f.stop_reason for f in finals] == [pb.STOP_REASON_SHUTDOWN] * 2
        assert replicas[0].wait() == 0
    with replicas[2].client() as other:
        for session_id, final in zip(ids, finals, strict=True):
            session = other.session(session_id)
            assert session.info().step == final.step  # 0 steps lost
            assert session.train(3).wait().step == final.step + 3  # continues elsewhere


def test_capacity_beyond_one_replicas_resident_cap(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    replicas = start_replicas(
        server_factory, redis_server, tmp_path / "shared", max_resident_sessions=2
    )
    ids = [f"c{i}" for i in range(6)]
    with replicas[0].client() as client:
        for i, session_id in enumerate(ids):
            client.create_session(TEXT, session_id=session_id, hidden_size=16, seed=i)
    for round_ in range(2):
        for k, session_id in enumerate(ids):
            with replicas[(k + round_) % 3].client() as client:
                assert client.session(session_id).step().step == round_ + 1
    with replicas[2].client() as client:
        assert sorted(s.session_id for s in client.list_sessions()) == ids


def test_session_flow_through_nginx(
    server_factory: ServerFactory,
    redis_server: RedisProcess,
    nginx_factory: NginxFactory,
    tmp_path: Path,
) -> None:
    replicas = start_replicas(server_factory, redis_server, tmp_path / "shared")
    nginx = nginx_factory([r.address for r in replicas])
    with Client(nginx.address, timeout=30) as client:
        session = client.create_session(TEXT, session_id="via-nginx", hidden_size=16, seed=1)
        assert session.train(30, report_every=10).wait().step == 30
        watch = session.watch_loss(from_step=1)
        steps = []
        for point in watch:
            steps.append(point.step)
            if point.step >= 30:
                break
        watch.cancel()
        assert steps == list(range(1, 31))
        assert len(session.generate(50, prime="the", seed=3)) == 50
        session.append_text("the lazy fox. " * 100)
        assert session.info().step == 30
        assert [s.session_id for s in client.list_sessions()] == ["via-nginx"]


def stream_events(redis: RedisProcess, session_id: str) -> list[dict[str, str]]:
    """Every entry of the session's loss stream in Redis, oldest first."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis.url, decode_responses=True)
    try:
        entries: Any = client.xrange(f"rnnserve:s:{{{session_id}}}:loss")
    finally:
        client.close()
    return [{str(k): str(v) for k, v in fields.items()} for _, fields in entries]


def frozen(server: ServerHandle) -> bool:
    """True once every thread of the server's process is stopped (SIGSTOP)."""
    states = []
    for task in Path(f"/proc/{server.process.pid}/task").iterdir():
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
    return all(state in "Tt" for state in states)


def kill_if_ahead_of_checkpoint(
    server: ServerHandle, redis: RedisProcess, session_id: str, seen: int, past: int = 0
) -> int | None:
    """Kill -9 the owner ``server`` if its death now loses steps the caller (who saw ``seen``)
    and the watchers saw: the checkpoint it dies with (past step ``past``) is behind both;
    that checkpoint's step, or None (it runs on). Looked at while it is frozen, so no
    checkpoint or loss point of its can land between the look and the kill."""
    server.process.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: frozen(server), what="the owner frozen")
        checkpointed = stream_ahead_of_checkpoint(redis, session_id)
        if checkpointed is not None and past < checkpointed < seen:
            server.kill()
            return checkpointed
        return None
    finally:
        if server.alive:
            server.process.send_signal(signal.SIGCONT)


def stream_ahead_of_checkpoint(redis: RedisProcess, session_id: str) -> int | None:
    """The step of the session's latest checkpoint if its loss stream already carries a later
    step (a kill -9 now loses steps watchers saw); else None."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis.url, decode_responses=True)
    try:
        client.ping()  # after what a frozen writer had sent: Redis ran it by the reply
        pointer: Any = client.get(f"rnnserve:s:{{{session_id}}}:ckpt")
        last: Any = client.xrevrange(f"rnnserve:s:{{{session_id}}}:loss", count=1)
    finally:
        client.close()
    if pointer is None or not last:
        return None
    checkpointed = int(str(pointer).removesuffix(".npz").split("-")[1])
    return checkpointed if int(last[0][1]["step"]) > checkpointed else None


def replay(steps: list[int], rollbacks: list[int]) -> list[int]:
    """The steps a watcher saw with each announced rollback applied: the steps it saw again
    after a rollback to R replace the ones after R. Asserts every step back was announced
    (and resumes at R + 1)."""
    kept: list[int] = []
    announced = iter(rollbacks)
    for step in steps:
        if kept and step <= kept[-1]:
            restored = next(announced, None)
            assert restored is not None, f"unannounced step back from {kept[-1]} to {step}"
            assert step == restored + 1, (step, restored)
            kept = kept[:restored]
        kept.append(step)
    assert next(announced, None) is None, "an announced rollback that never happened"
    return kept


@pytest.mark.parametrize("trial", range(10))
def test_kill9_owner_mid_train_fails_over_and_watchers_see_one_announced_rollback(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path, trial: int
) -> None:
    """Seeded: the model size, when the owner dies and the target step vary by trial."""
    rng = random.Random(trial)
    kill_after = rng.randrange(100, 400)
    # Checkpoints every 0.1 s, and 800+ steps past kill_after: however fast this machine
    # trains, the owner checkpoints during the Train before it reaches the target.
    target = kill_after + rng.randrange(800, 1200)
    replicas = start_replicas(
        server_factory, redis_server, tmp_path / "shared", checkpoint_interval=0.1
    )
    with replicas[0].client() as owner:
        owner.create_session(TEXT, session_id="k", hidden_size=rng.choice([16, 32]), seed=trial)
        owner.session("k").step()  # replica 0 owns it; step 1 is on the stream
    wait_until(lambda: bool(stream_events(redis_server, "k")), what="step 1 on the stream")
    watched: list[int] = []
    announced: list[int] = []
    watcher_done = threading.Event()

    def watch() -> None:  # on replica 2, which never owns the session: the Redis stream
        with replicas[2].client(timeout=None) as client:
            stream = client.session("k").watch_loss(from_step=1)
            for point in stream:
                watched.append(point.step)
                if point.step >= target:
                    break
            announced.extend(stream.rollbacks)
        watcher_done.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    checkpointed_at_kill: list[int] = []
    seen_at_kill: list[int] = []

    def kill_past_a_checkpoint(message: pb.TrainResponse) -> None:
        if checkpointed_at_kill or message.step < kill_after:
            return
        # Killed once a checkpoint of this Train is behind the steps watchers and this
        # client saw: they are lost with the owner, and both see the rollback.
        checkpointed = kill_if_ahead_of_checkpoint(
            replicas[0], redis_server, "k", message.step, past=1
        )
        if checkpointed is not None:
            checkpointed_at_kill.append(checkpointed)
            seen_at_kill.append(message.step)

    with replicas[1].client() as client:  # forwards to the owner until it dies
        session = client.session("k")
        result = session.train_to(target, report_every=20, on_progress=kill_past_a_checkpoint)
        assert checkpointed_at_kill, "the owner was never killed"
        assert session.info().step == target  # completed on another replica
    assert result.retries >= 1

    # The stream: steps 1..L from the dead owner, one `restored` event at R (the checkpoint
    # it died with), then R+1..target from the new owner.
    events = stream_events(redis_server, "k")
    restores = [int(e["step"]) for e in events if e["kind"] == "restored"]
    assert restores == checkpointed_at_kill
    steps = [int(e["step"]) for e in events if e["kind"] == "loss"]
    assert replay(steps, restores) == list(range(1, target + 1))
    # The client reports the same rollback, from at least the step it saw at the kill.
    ((seen, restored),) = result.rollbacks
    assert restored == checkpointed_at_kill[0] and seen >= seen_at_kill[0]

    # The watcher on replica 2 saw the same: no gap apart from the one announced rollback.
    assert watcher_done.wait(60), "the watcher on replica 2 did not reach the target"
    assert announced == restores
    assert replay(watched, announced) == list(range(1, target + 1))


def redis_get(redis: RedisProcess, key: str) -> str | None:
    """One key's value from the test's Redis."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis.url, decode_responses=True)
    try:
        value: Any = client.get(key)
    finally:
        client.close()
    return None if value is None else str(value)


def test_paused_owner_cannot_write_after_its_lease_moved(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    replicas = start_replicas(
        server_factory, redis_server, tmp_path / "shared", count=2, checkpoint_interval=0.2
    )
    old, new = replicas
    key = "rnnserve:s:{p}:"
    with old.client(timeout=None) as client:
        client.create_session(TEXT, session_id="p", hidden_size=32, seed=1)
        stream = client.session("p").train(10**6, report_every=10)
        assert next(stream).step >= 1

        # The training owner's token is not always 1: the release loop may have let the
        # lease go between create and Train. Wait for a checkpoint under the current token.
        def checkpointed_under_current_token() -> bool:
            token = redis_get(redis_server, key + "token") or "?"
            return (redis_get(redis_server, key + "ckpt") or "").startswith(f"{token}-")

        wait_until(checkpointed_under_current_token, timeout=90, what="the owner's checkpoint")
        old_token = int(redis_get(redis_server, key + "token") or 0)
        old.process.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: redis_get(redis_server, key + "lease") is None, what="lease expiry")
            with new.client() as other:
                stepped = other.session("p").step().step  # activated on `new`, new token
            new_token = int(redis_get(redis_server, key + "token") or 0)
            assert new_token > old_token  # tokens only increase
        finally:
            old.process.send_signal(signal.SIGCONT)
        # The resumed owner finds its lease gone: it drops the session and its Train stops,
        # with a final message, or UNAVAILABLE if its checkpoint was refused first (the
        # client retries elsewhere: Session.train_to does).
        old.wait_for_log("lease_lost", session_id="p")
        try:
            final = stream.wait()
            assert final.stop_reason != pb.STOP_REASON_UNSPECIFIED
        except ServerUnavailable:
            pass
    # No write of the old owner became the latest: once the new owner's write-behind
    # checkpoint of its Step lands, the pointer carries the new token and keeps it.
    wait_until(
        lambda: (redis_get(redis_server, key + "ckpt") or "").startswith(f"{new_token}-"),
        what="the new owner's checkpoint",
    )
    with new.client() as other:
        assert other.session("p").info().step == stepped
    with old.client() as again:  # the old owner now forwards to the new one
        assert again.session("p").step().step == stepped + 1
        pointer = redis_get(redis_server, key + "ckpt") or ""
        assert pointer.startswith(f"{new_token}-"), pointer
        # A refused stale write is not a storage failure: the old replica keeps serving.
        wait_until(lambda: again.health() == "SERVING", what="old replica SERVING")
    assert new.process.poll() is None and old.process.poll() is None


def test_health_follows_redis_and_service_recovers(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    (replica,) = start_replicas(server_factory, redis_server, tmp_path / "shared", count=1)
    with replica.client(timeout=5) as client:
        session = client.create_session(TEXT, session_id="r", hidden_size=16, seed=1)
        assert session.step().step == 1
        redis_server.stop()
        wait_until(lambda: client.health() == "NOT_SERVING", what="NOT_SERVING without Redis")
        redis_server.start()
        wait_until(lambda: client.health() == "SERVING", what="SERVING with Redis back")
        assert session.step().step == 2  # the lease survived (or was taken again)


def free_loopback_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """GET /metrics: {sample name: value} of the unlabelled samples."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode("utf-8")
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
        if not sample.labels
    }


def test_cluster_metrics(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    ports = [free_loopback_port(), free_loopback_port()]
    owner, other = (
        server_factory(
            redis_url=redis_server.url, shared_dir=tmp_path / "shared", lease_ttl=2, metrics_port=p
        )
        for p in ports
    )
    with owner.client() as client:
        client.create_session(TEXT, session_id="m", hidden_size=16, seed=1)
    with other.client() as client:
        for _ in range(3):
            client.session("m").step()  # forwarded to the owner
    mine, theirs = scrape(ports[0]), scrape(ports[1])
    assert mine.get("rnnserve_cluster_owned_sessions") == 1
    assert theirs.get("rnnserve_cluster_owned_sessions") == 0
    assert theirs.get("rnnserve_cluster_forwards_total") == 3
    assert mine.get("rnnserve_cluster_forwards_total") == 0
    assert mine.get("rnnserve_cluster_redis_up") == 1
    assert mine.get("rnnserve_cluster_failovers_total") == 0
    assert mine.get("rnnserve_cluster_lease_renew_failures_total") == 0


CLUSTER_ARGV = ["--redis-url", "redis://h/0", "--shared-dir", "/tmp/x"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--redis-url", "redis://127.0.0.1:1/0"], "--redis-url needs --shared-dir"),
        (["--shared-dir", "/tmp/x"], "give --redis-url too"),
        (
            ["--redis-url", "redis://h/0", "--shared-dir", "/tmp/x", "--lease-ttl", "0"],
            "--lease-ttl must be > 0",
        ),
        (
            [*CLUSTER_ARGV, "--tls-cert", "c.pem", "--tls-key", "k.pem"],
            "needs mutual TLS between replicas",
        ),
    ],
)
def test_cluster_settings_that_cannot_work_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from rnnserve_server.config import load_settings

    with pytest.raises(SystemExit) as exit_info:
        load_settings(argv, environ={})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
