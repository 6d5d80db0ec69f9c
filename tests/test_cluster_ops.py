"""Cluster mode, operations: a Redis restart, scheduled garbage collection of checkpoint blobs,
ForkSession / ImportSession onto a taken id owned by another replica, and validation losses on
the loss stream. Real redis-server and rnnserve-server replicas, as in test_cluster.py."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rnnserve import SessionExists

from tests.test_cluster import TEXT, start_replicas, stream_events, wait_until

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
