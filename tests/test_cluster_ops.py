"""Cluster mode, operations: a Redis restart, scheduled garbage collection of checkpoint blobs,
ForkSession / ImportSession onto a taken id owned by another replica, and validation losses on
the loss stream. Real redis-server and rnnserve-server replicas, as in test_cluster.py."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rnnserve import SessionExists

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
    from tests.conftest import ServerFactory

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
