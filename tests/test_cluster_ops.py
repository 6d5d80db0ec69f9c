"""Cluster mode, operations: a Redis restart, scheduled garbage collection of checkpoint blobs,
ForkSession / ImportSession onto a taken id owned by another replica, and validation losses on
the loss stream. Real redis-server and rnnserve-server replicas, as in test_cluster.py."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from rnnserve import Client, ServerUnavailable, SessionExists, Timeout

from tests.test_cluster import (
    TEXT,
    free_loopback_port,
    redis_get,
    scrape,
    start_replicas,
    stream_events,
    wait_until,
)

if TYPE_CHECKING:
    from tests.cluster_fixtures import RedisProcess
    from tests.conftest import ServerFactory, ServerHandle

pytestmark = pytest.mark.timeout(180)


def test_fork_and_import_onto_an_id_owned_by_another_replica_is_already_exists(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    owner, other = start_replicas(server_factory, redis_server, tmp_path / "shared", count=2)
    with owner.client() as on_owner, other.client() as on_other:
        on_owner.create_session(TEXT, session_id="taken", hidden_size=16, seed=1)
        assert on_owner.session("taken").step().step == 1  # `owner` holds its lease
        source = on_other.create_session(TEXT, session_id="src", hidden_size=16, seed=2)
        assert source.step().step == 1  # `other` holds this one
        archive = source.export()
        with pytest.raises(SessionExists) as forked:
            source.fork("taken")
        with pytest.raises(SessionExists) as imported_named:
            on_other.import_session(archive, session_id="taken")
        with pytest.raises(SessionExists) as imported_as_archived:
            on_owner.import_session(archive)  # the archive's id, "src", held by `other`
        assert imported_as_archived.value.metadata.get("session_id") == "src"
        for error in (forked.value, imported_named.value):
            assert error.reason == "SESSION_EXISTS", error
            assert error.metadata.get("session_id") == "taken", error
        # The taken session is untouched, and a free id still works.
        assert on_owner.session("taken").info().step == 1
        assert source.fork("copy").info().step == 1
        assert on_owner.import_session(archive, session_id="copy2").info().step == 1
        assert sorted(s.session_id for s in on_owner.list_sessions()) == [
            "copy",
            "copy2",
            "src",
            "taken",
        ]


def test_watchers_on_any_replica_get_validation_losses_from_the_stream(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    owner, other = start_replicas(server_factory, redis_server, tmp_path / "shared", count=2)
    with owner.client() as on_owner, other.client() as on_other:
        session = on_owner.create_session(
            TEXT, session_id="val", hidden_size=16, seed=1, validation_fraction=0.2
        )
        messages = list(session.train(40, report_every=10))
        measured = {m.step: m.validation_loss for m in messages if m.HasField("validation_loss")}
        assert sorted(measured) == [10, 20, 30, 40]
        wait_until(
            lambda: any(e.get("step") == "40" for e in stream_events(redis_server, "val")),
            what="step 40 on the loss stream",
        )
        on_stream = {
            int(e["step"]): float(e["val"])
            for e in stream_events(redis_server, "val")
            if "val" in e
        }
        assert on_stream == pytest.approx(measured)
        points = []
        with on_other.session("val").watch_loss(1) as stream:  # `other` follows the stream
            for point in stream:
                points.append(point)
                if point.step == 40:
                    break
        assert [p.step for p in points] == list(range(1, 41))
        got = {p.step: p.validation_loss for p in points if p.HasField("validation_loss")}
        assert got == pytest.approx(measured)
        assert other.process.poll() is None


def redis_blocked_clients(redis: RedisProcess) -> int:
    """How many Redis clients are blocked in a command (XREAD BLOCK) right now."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis.url, decode_responses=True)
    try:
        info: Any = client.info("clients")
    finally:
        client.close()
    return int(info["blocked_clients"])


def test_watchers_on_a_replica_share_one_reader_of_the_stream(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    owner, other = start_replicas(server_factory, redis_server, tmp_path / "shared", count=2)
    with owner.client() as on_owner:
        session = on_owner.create_session(TEXT, session_id="fan", hidden_size=16, seed=1)
        session.step()
    wait_until(lambda: bool(stream_events(redis_server, "fan")), what="step 1 on the stream")
    target, watchers = 300, 20
    seen: list[list[int]] = [[] for _ in range(watchers)]
    with other.client(timeout=None) as on_other:

        def watch(points: list[int]) -> None:  # on `other`, which follows the Redis stream
            with on_other.session("fan").watch_loss(1) as stream:
                for point in stream:
                    points.append(point.step)
                    if point.step >= target:
                        break

        threads = [threading.Thread(target=watch, args=(p,), daemon=True) for p in seen]
        for thread in threads:
            thread.start()
        wait_until(lambda: all(seen), what="every watcher's first point")
        # All 20 now wait for new points: through one shared XREAD BLOCK, not 20.
        blocked = []
        for _ in range(40):
            blocked.append(redis_blocked_clients(redis_server))
            threading.Event().wait(0.05)  # sampling interval, not synchronization
        assert max(blocked) == 1, blocked
        with owner.client() as on_owner:
            on_owner.session("fan").train_to(target, report_every=50)
        for thread in threads:
            thread.join(timeout=60)
    assert all(points == list(range(1, target + 1)) for points in seen)


def shared_blobs(shared: Path, session_id: str) -> list[str]:
    """The file names in a session's shared directory, sorted."""
    return sorted(p.name for p in (shared / session_id).iterdir())


def test_scheduled_gc_removes_unreferenced_blobs_and_keeps_the_latest(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    ports = [free_loopback_port(), free_loopback_port()]
    first, second = (
        server_factory(
            redis_url=redis_server.url,
            shared_dir=shared,
            lease_ttl=2,
            gc_interval=0.2,
            gc_grace=1,
            metrics_port=port,
        )
        for port in ports
    )
    with first.client() as client:
        session = client.create_session(TEXT, session_id="g", hidden_size=16, seed=1)
        final = session.train(20).wait()  # checkpointed before its final message
    pointer = redis_get(redis_server, "rnnserve:s:{g}:ckpt")
    assert pointer is not None and shared_blobs(shared, "g") == [pointer]
    token, step = (int(x) for x in pointer.removesuffix(".npz").split("-"))
    assert step == final.step
    # What no later put of this (now idle) session would clean up: an older blob, a crashed
    # writer's temporary file; and a blob ahead of the pointer under the session's current
    # token, which its owner may still point at: kept.
    data = (shared / "g" / pointer).read_bytes()
    older, ahead = f"{token}-{step - 5}.npz", f"{token}-{step + 100}.npz"
    tmp = f".tmp-{token}-{step + 1}.npz.4242"
    for name in (older, ahead, tmp):
        (shared / "g" / name).write_bytes(data)
    wait_until(
        lambda: shared_blobs(shared, "g") == sorted([pointer, ahead]),
        timeout=60,
        what="the sweep to remove the older blob and the temporary file",
    )
    removed = sum(scrape(p).get("rnnserve_cluster_gc_removed_total", 0) for p in ports)
    assert removed == 2
    assert redis_get(redis_server, "rnnserve:s:{g}:ckpt") == pointer
    # The session loads from what is left, on the other replica (the first one drains).
    assert first.stop() == 0
    with second.client() as client:
        again = client.session("g")
        assert again.info().step == step
        assert again.step().step == step + 1
        assert len(again.generate(20, prime="the", seed=2)) == 20
    # The new owner's token is newer: nothing can point at the old blob ahead any more, and
    # the older checkpoint goes once the new one is the latest.
    wait_until(
        lambda: len(names := shared_blobs(shared, "g")) == 1 and names[0] != pointer,
        timeout=60,
        what="only the new owner's checkpoint left",
    )
    latest = redis_get(redis_server, "rnnserve:s:{g}:ckpt")
    assert shared_blobs(shared, "g") == [latest]
    assert latest is not None and latest.startswith(f"{token + 1}-{step + 1}")


@pytest.mark.parametrize(
    ("flag", "message"),
    [("--gc-interval", "--gc-interval must be >= 0"), ("--gc-grace", "--gc-grace must be >= 0")],
)
def test_negative_gc_settings_are_refused(
    flag: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from rnnserve_server.config import load_settings

    argv = ["--redis-url", "redis://h/0", "--shared-dir", "/tmp/x", flag, "-1"]
    with pytest.raises(SystemExit) as exit_info:
        load_settings(argv, environ={})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


class Stepper:
    """Steps sessions in a loop from a thread (2 s deadline a call) and keeps every outcome:
    ``(monotonic time, ok, status code name)``, and how many Steps each session acknowledged."""

    def __init__(self, client: Client, ids: list[str]) -> None:
        self.client, self.ids = client, ids
        self.results: list[tuple[float, bool, str]] = []
        self.acknowledged: dict[str, int] = dict.fromkeys(ids, 0)
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                session_id = self.ids[i % len(self.ids)]
                i += 1
                try:
                    self.client.session(session_id).step(timeout=2)
                except (ServerUnavailable, Timeout) as exc:
                    self.results.append((time.monotonic(), False, exc.code_name))
                    self._stop.wait(0.01)  # back off a little before the next call
                    continue
                self.acknowledged[session_id] += 1
                self.results.append((time.monotonic(), True, ""))
        except BaseException as exc:  # any other error fails the test
            self.errors.append(exc)

    def successes_after(self, t: float) -> int:
        return sum(1 for when, ok, _ in list(self.results) if ok and when > t)

    def __enter__(self) -> Stepper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the stepper did not stop"


def wait_health(replica: ServerHandle, status: str) -> None:
    """Poll the replica's health until it reports ``status``."""
    with replica.client(timeout=5) as client:
        wait_until(lambda: client.health() == status, what=f"{status} on {replica.address}")


def unavailable_beyond(stepper: Stepper, ready: float) -> float:
    """Seconds from Redis answering again to the first success after the stepper's last
    failure (0 if no call failed)."""
    failures = [when for when, ok, _ in stepper.results if not ok]
    if not failures:
        return 0.0
    last = max(failures)
    first_ok = min(when for when, ok, _ in stepper.results if ok and when > last)
    return max(0.0, first_ok - ready)


def three_paths(
    server_factory: ServerFactory, redis: RedisProcess, shared: Path, lease_ttl: float
) -> tuple[list[ServerHandle], dict[str, tuple[ServerHandle, list[str]]]]:
    """Two replicas and three ways to reach a session: via its owner (replica 0), via the
    other replica (forwarded to the owner), and in turn 30 sessions no replica holds at the
    start (the first call of each, on replica 1, activates it: a lease and a load; after
    their leases lapse, again)."""
    replicas = start_replicas(server_factory, redis, shared, count=2, lease_ttl=lease_ttl)
    with replicas[0].client() as client:
        for session_id in ("own", "fwd"):
            client.create_session(TEXT, session_id=session_id, hidden_size=16, seed=1)
    (creator,) = start_replicas(server_factory, redis, shared, count=1, lease_ttl=lease_ttl)
    idle = [f"idle{i}" for i in range(30)]
    with creator.client() as client:
        for session_id in idle:
            client.create_session(TEXT, session_id=session_id, hidden_size=8, seed=1)
    assert creator.stop() == 0  # drained: its sessions are held by no replica
    paths = {
        "owner": (replicas[0], ["own"]),
        "forwarded": (replicas[1], ["fwd"]),
        "activation": (replicas[1], idle),
    }
    return replicas, paths


def test_redis_restart_under_load_loses_no_step_and_is_measured(
    server_factory: ServerFactory,
    redis_server: RedisProcess,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    lease_ttl = 10.0  # a restart (0.1-0.2 s) is far shorter, even on a loaded machine
    replicas, paths = three_paths(server_factory, redis_server, tmp_path / "shared", lease_ttl)
    token_before = int(redis_get(redis_server, "rnnserve:s:{own}:token") or 0)
    clients = {name: replica.client() for name, (replica, _) in paths.items()}
    steppers = {name: Stepper(clients[name], ids) for name, (_, ids) in paths.items()}
    try:
        with contextlib.ExitStack() as stack:
            for stepper in steppers.values():
                stack.enter_context(stepper)
            started = time.monotonic()
            wait_until(
                lambda: all(s.successes_after(started) >= 3 for s in steppers.values()),
                what="every path serving before the restart",
            )
            stopped = time.monotonic()
            redis_server.restart()  # SIGTERM (the append-only file is written), start again
            ready = time.monotonic()
            wait_until(
                lambda: all(s.successes_after(ready) >= 3 for s in steppers.values()),
                what="every path serving after the restart",
            )
            for replica in replicas:
                wait_health(replica, "SERVING")
        for stepper in steppers.values():
            assert not stepper.errors, stepper.errors
        assert ready - stopped < lease_ttl, "the restart itself outlasted the leases"
        # Nothing acknowledged was lost: the leases outlived the restart, so the owners kept
        # their sessions and their write-behind checkpoints went through once Redis was back.
        with replicas[1].client() as client:
            for name, stepper in steppers.items():
                for session_id, count in stepper.acknowledged.items():
                    assert client.session(session_id).info().step == count, (name, session_id)
        # The fencing token survived (append-only file): the same lease, the same token.
        assert int(redis_get(redis_server, "rnnserve:s:{own}:token") or 0) == token_before
        measured = {name: unavailable_beyond(s, ready) for name, s in steppers.items()}
        failed = {name: sum(not ok for _, ok, _ in s.results) for name, s in steppers.items()}
        record_property("redis_restart_s", round(ready - stopped, 3))
        record_property("unavailable_beyond_redis_s", measured)
        record_property("failed_steps", failed)
        print(f"redis restart {ready - stopped:.3f} s; beyond it {measured}; failed {failed}")
    finally:
        for client in clients.values():
            client.close()


def test_redis_outage_past_the_lease_ttl_recovers_with_larger_tokens(
    server_factory: ServerFactory,
    redis_server: RedisProcess,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    replicas, paths = three_paths(server_factory, redis_server, tmp_path / "shared", 2.0)
    owner, other = replicas
    with owner.client() as client:
        session = client.session("own")
        for _ in range(5):
            session.step()
        wait_until(
            lambda: (lambda i: i.checkpointed_step == i.step == 5)(session.info()),
            what="step 5 checkpointed",
        )
    token_before = int(redis_get(redis_server, "rnnserve:s:{own}:token") or 0)
    mark = owner.mark()
    redis_server.stop()
    stopped = time.monotonic()
    with owner.client(timeout=2) as client:
        # Steps go on while the owner can: they are acknowledged (write-behind) but their
        # checkpoint cannot reach the fenced pointer, so the owner soon refuses them.
        acknowledged = 0
        while True:
            try:
                client.session("own").step()
                acknowledged += 1
            except (ServerUnavailable, Timeout):
                break
            assert acknowledged < 100_000
    # The leases lapse by the replicas' own clocks (no Redis to renew them).
    owner.wait_for_log("lease_lost", start=mark, session_id="own")
    for replica in replicas:
        wait_health(replica, "NOT_SERVING")
    redis_server.start()
    ready = time.monotonic()
    steppers = {name: Stepper(replica.client(), ids) for name, (replica, ids) in paths.items()}
    try:
        with contextlib.ExitStack() as stack:
            for stepper in steppers.values():
                stack.enter_context(stepper)
            wait_until(
                lambda: all(s.successes_after(ready) >= 1 for s in steppers.values()),
                what="every path serving after Redis is back",
            )
        for stepper in steppers.values():
            assert not stepper.errors, stepper.errors
    finally:
        for stepper in steppers.values():
            stepper.client.close()
    for replica in replicas:
        wait_health(replica, "SERVING")
    # The session came back from its last checkpoint (step 5): the Steps acknowledged while
    # Redis was down, never checkpointed, are lost, as when an owner dies.
    owner_steps = steppers["owner"].acknowledged["own"]
    with other.client() as client:
        assert client.session("own").info().step == 5 + owner_steps
    # The token counter survived the restart (append-only file): the new lease's is larger.
    assert int(redis_get(redis_server, "rnnserve:s:{own}:token") or 0) > token_before
    first_ok = {
        name: min(when for when, ok, _ in s.results if ok) - ready for name, s in steppers.items()
    }
    record_property("redis_down_s", round(ready - stopped, 3))
    record_property("first_step_after_redis_back_s", first_ok)
    record_property("steps_lost", acknowledged)
    print(f"down {ready - stopped:.2f} s; first Step after it {first_ok}; lost {acknowledged}")
