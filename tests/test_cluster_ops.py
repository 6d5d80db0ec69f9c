"""Cluster mode, operations: a Redis restart, scheduled garbage collection of checkpoint blobs,
ForkSession / ImportSession onto a taken id owned by another replica, and validation losses on
the loss stream. Real redis-server and rnnserve-server replicas, as in test_cluster.py."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from rnnserve import SessionExists

from tests.test_cluster import TEXT, start_replicas

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
