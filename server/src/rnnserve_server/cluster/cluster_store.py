"""The registry's Store in cluster mode: the local data directory is this replica's working
copy; every checkpoint also goes to the shared directory under the session's fencing token,
and a session is loaded from the shared directory's latest checkpoint.

The registry calls these methods from its I/O threads; the Redis client lives on the event
loop, so the coordinator's coroutines are run there and waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from redis.exceptions import RedisError

from rnnserve_server.cluster.ownership import Ownership
from rnnserve_server.cluster.shared_store import (
    CheckpointMissingError,
    SharedStore,
    StaleTokenError,
)
from rnnserve_server.errors import CheckpointError, LeaseLostError, StorageError
from rnnserve_server.storage.checkpoint import Checkpoint, MetaCheck
from rnnserve_server.storage.local_store import LocalStore

T = TypeVar("T")

# Redis calls made from an I/O thread give up after this long (the lease TTL is shorter).
_BRIDGE_TIMEOUT = 30.0
_REDIS_SILENT = "the cluster coordinator (Redis) is not answering, so {what}; retry in a moment"


def pack(state: bytes, corpus: bytes) -> bytes:
    """One blob holding a session's two files (state and corpus)."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        state=np.frombuffer(state, dtype=np.uint8),
        corpus=np.frombuffer(corpus, dtype=np.uint8),
    )
    return buffer.getvalue()


def unpack(blob: bytes) -> tuple[bytes, bytes]:
    """The (state, corpus) file contents of a blob made by :func:`pack`."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return npz["state"].tobytes(), npz["corpus"].tobytes()


class ClusterStore(LocalStore):
    """A :class:`Store` whose checkpoints are fenced and shared between replicas."""

    def __init__(
        self,
        data_dir: Path,
        shared: SharedStore,
        ownership: Ownership,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(data_dir)
        self.shared = shared
        self.ownership = ownership
        self.loop = loop
        self.stale_writes = 0  # checkpoints refused because another replica owns the session
        # Told (id, token) when a new session's first checkpoint claims its lease.
        self.on_claimed: Callable[[str, int], None] | None = None
        # Told the id when a write was refused as stale (called on the event loop).
        self.on_stale: Callable[[str], None] | None = None

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(_BRIDGE_TIMEOUT)

    def open(self) -> list[str]:
        """The local working copy starts empty: sessions live in the shared directory."""
        removed = super().open()
        for path in self.sessions_dir.iterdir():
            with contextlib.suppress(OSError):
                path.unlink()
        return removed

    def scan(self) -> tuple[list[str], list[str]]:
        """Nothing is loaded at start: sessions are activated on their first call."""
        return [], []

    async def _token_for(self, session_id: str) -> int:
        lease = self.ownership.lease(session_id)
        if lease is not None:
            return lease.token
        # A new session (not yet in the directory) is claimed by its first checkpoint.
        coordinator = self.ownership.coordinator
        if not await coordinator.exists(session_id):
            claim = await self.ownership.claim(session_id)
            # (The claim may have waited for a rebuild of the directory that brought the id
            # back: then it is not new.)
            if not isinstance(claim, str) and not await coordinator.exists(session_id):
                if self.on_claimed is not None:
                    self.on_claimed(session_id, claim.token)
                return claim.token
        raise StaleTokenError(f"session {session_id!r}: this replica no longer owns it")

    async def _put(self, session_id: str, step: int, blob: bytes) -> None:
        token = await self._token_for(session_id)
        await self.shared.put(session_id, token, step, blob)
        await self.ownership.coordinator.register(session_id)
        # The checkpoint is kept whatever happens here: a failed gc is retried by the next
        # put or the scheduled sweep.
        with contextlib.suppress(OSError, RedisError):
            await self.shared.gc(session_id)

    def save(self, ckpt: Checkpoint) -> int:
        """Write the local working copy, then the shared blob under our fencing token.

        Raises LeaseLostError when the token is stale (another replica owns the session):
        the write is refused, never made the latest."""
        size = super().save(ckpt)
        blob = pack(
            self.path(ckpt.session_id).read_bytes(),
            self.corpus_path(ckpt.session_id).read_bytes(),
        )
        try:
            self._wait(self._put(ckpt.session_id, int(ckpt.meta["step"]), blob))
        except StaleTokenError as exc:
            self.stale_writes += 1
            if self.on_stale is not None:
                self.loop.call_soon_threadsafe(self.on_stale, ckpt.session_id)
            raise LeaseLostError.moved(ckpt.session_id) from exc
        except (RedisError, TimeoutError) as exc:  # down, or frozen past its op timeout
            raise StorageError(_REDIS_SILENT.format(what="the change could not be saved")) from exc
        return size

    def load(self, session_id: str, check: MetaCheck | None = None) -> Checkpoint:
        """Fetch the session's latest shared checkpoint into the working copy and read it."""
        try:
            latest = self._wait(self.shared.latest(session_id))
        except CheckpointMissingError as exc:
            raise CheckpointError(str(exc), public="its latest checkpoint is missing") from None
        except (RedisError, TimeoutError) as exc:  # not the checkpoint's fault: not BROKEN
            what = "the session could not be loaded"
            raise StorageError(_REDIS_SILENT.format(what=what)) from exc
        if latest is None:
            raise CheckpointError(
                f"session {session_id!r} has no checkpoint in the shared directory",
                public="it has no checkpoint",
            )
        state, corpus = unpack(latest.data)
        self._write_atomic(self.corpus_path(session_id), lambda f: f.write(corpus))
        self._write_atomic(self.path(session_id), lambda f: f.write(state))
        return super().load(session_id, check)

    def forget(self, session_id: str) -> None:
        """Drop the local working copy (the session left this replica)."""
        for path in (self.path(session_id), self.corpus_path(session_id)):
            with contextlib.suppress(OSError):
                path.unlink()

    def delete(self, session_id: str) -> bool:
        """Remove the session from the directory, the shared directory and here."""
        coordinator = self.ownership.coordinator

        async def remove() -> bool:
            found = await coordinator.exists(session_id)
            await coordinator.unregister(session_id)
            await self.shared.delete(session_id)
            return found

        found = self._wait(remove())
        local = super().delete(session_id)
        return found or local
