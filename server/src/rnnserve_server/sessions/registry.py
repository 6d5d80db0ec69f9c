"""id -> Session: the directory of a server's sessions: creation, lookup, deletion, loading.

It is composed of the parts that keep the sessions: the factory (factory.py) makes them, the
checkpoint writer (checkpoint_writer.py) writes them behind, residency (residency.py) evicts;
the server's size limits are limits.py's.

All methods run on the event loop; blocking work (model set-up, disk I/O) goes to executors.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from rnnserve_server.config import Settings
from rnnserve_server.engine.model_config import ModelConfig
from rnnserve_server.engine.vocab import utf8_size
from rnnserve_server.errors import (
    CheckpointError,
    SessionBrokenError,
    SessionExistsError,
    SessionNotFoundError,
    ShuttingDownError,
    StorageError,
)
from rnnserve_server.logs import get_logger
from rnnserve_server.metrics import SessionGauges, SessionPoint
from rnnserve_server.sessions.checkpoint_writer import CheckpointWriter, storage_error
from rnnserve_server.sessions.factory import SessionFactory, damaged, public_reason
from rnnserve_server.sessions.limits import (
    check_alphabet_size,
    check_corpus_limits,
    limit_error,
)
from rnnserve_server.sessions.residency import Residency, resident_bytes, session_bytes
from rnnserve_server.sessions.session import Session
from rnnserve_server.sessions.session_types import Broken, StopCause
from rnnserve_server.storage.checkpoint import Checkpoint, validate_session_id
from rnnserve_server.storage.store import Store

log = get_logger("rnnserve.registry")

T = TypeVar("T")


class Registry:
    """The sessions of one server and the data directory behind them, with the parts that
    keep them: ``factory`` makes them, ``checkpoints`` writes them behind, ``residency``
    decides which stay in memory."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.sessions: dict[str, Session] = {}
        self.reserved: set[str] = set()  # ids being created
        self.shutting_down = False
        # Training and sampling run here; disk I/O has its own pool so checkpoints never queue
        # behind long training chunks.
        self.compute = ThreadPoolExecutor(max_workers=32, thread_name_prefix="rnnserve-compute")
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rnnserve-io")
        self.factory = SessionFactory(settings, store)
        self.checkpoints = CheckpointWriter(store, self.io)
        self.residency = Residency(settings, self.sessions, self.checkpoints)
        # Residency asks for a checkpoint before it evicts a changed session; once written,
        # the session can go.
        self.checkpoints.after_writes = self._evict_after_writes
        self._evictor: asyncio.Task[None] | None = None
        # Cluster mode: True if an id not in this registry is taken by a session kept
        # elsewhere (another replica, the shared directory); False leaves the id claimed by
        # this replica until the new session is written. None in one process.
        self.taken_elsewhere: Callable[[str], Awaitable[bool]] | None = None

    def _evict_after_writes(self) -> None:
        if not self.shutting_down:
            self.residency.evict_over_limit()

    # ----- executors --------------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the compute pool."""
        return await asyncio.get_running_loop().run_in_executor(self.compute, fn, *args)

    async def run_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in the I/O pool."""
        return await asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    # ----- start and stop ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the data directory and load every checkpoint in it (broken ones as BROKEN)."""
        removed = await self.run_io(self.store.open)
        if removed:
            log.warning("removed_temp_files", count=len(removed), files=removed[:10])
        for name in await self.run_io(self.store.remove_orphans):
            log.warning("removed_orphan_corpus", file=name)
        ids, ignored = await self.run_io(self.store.scan)
        if ignored:
            log.warning("ignored_files", directory=self.store.location, files=ignored[:20])
        broken = 0
        for session_id in ids:
            session = await self.run_io(self.factory.load, session_id)
            self.sessions[session_id] = session
            if session.broken is not None:
                broken += 1
            elif self.residency.over_budget():
                session.evict()
        log.info(
            "sessions_loaded",
            sessions=len(self.sessions),
            broken=broken,
            resident=self.residency.resident_count(),
            data_dir=self.store.location,
        )
        self._evictor = asyncio.create_task(self.residency.evict_loop())

    def begin_shutdown(self) -> None:
        """Refuse new work, stop running Trains and end watch streams."""
        self.shutting_down = True
        for session in self.sessions.values():
            if session.busy == "Train" or session.active_job is not None:
                session.request_stop(StopCause.SHUTDOWN)
            session.close_watchers()

    async def close(self) -> bool:
        """Checkpoint every session with unsaved changes, then release the data directory.

        False (and the ids logged) if some session's changes could not be saved."""
        if self._evictor is not None:
            self._evictor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._evictor
        await asyncio.gather(
            *(self.checkpoints.flush(s) for s in list(self.sessions.values()) if s.resident),
            return_exceptions=True,
        )
        unsaved = sorted(s.id for s in self.sessions.values() if s.resident and s.unsaved_changes)
        if unsaved:
            log.error(
                "shutdown_unsaved",
                sessions=unsaved[:20],
                count=len(unsaved),
                error="their last changes could not be checkpointed and are lost",
            )
        self.compute.shutdown(wait=True, cancel_futures=True)
        self.io.shutdown(wait=True)
        self.store.close()
        return not unsaved

    def check_serving(self) -> None:
        """ShuttingDownError once shutdown began."""
        if self.shutting_down:
            raise ShuttingDownError("the server is shutting down; retry against another instance")

    # ----- lookup -----------------------------------------------------------------------

    def get(self, session_id: str) -> Session:
        """The session (resident or not); InvalidArgumentError (bad id), SessionNotFoundError."""
        validate_session_id(session_id)
        session = self.sessions.get(session_id)
        if session is None:
            raise _not_found(session_id)
        return session

    @contextlib.asynccontextmanager
    async def use(self, session_id: str) -> AsyncIterator[Session]:
        """A loaded, non-broken session, kept resident until the block ends."""
        self.check_serving()
        session = self.get(session_id)
        session.use.users += 1
        try:
            await self._ensure_loaded(session)
            session.use.last_used = time.monotonic()
            yield session
        finally:
            session.use.users -= 1
            session.use.last_used = time.monotonic()
        self.residency.evict_over_limit(keep=session)

    async def _ensure_loaded(self, session: Session) -> None:
        if session.resident:
            return
        if session.broken is not None:
            session.require_trainer()  # raises SessionBrokenError
        async with session.load_lock:
            if session.resident:
                return
            await self.residency.make_room(session_bytes(session), keep=session)
            try:
                ckpt = await self.run_io(self.store.load, session.id, self.factory.check_checkpoint)
                await self.run(session.attach, ckpt)
            except StorageError:
                raise  # the store can't be reached now (cluster mode: Redis): not BROKEN
            except Exception as exc:
                error = str(exc) if isinstance(exc, CheckpointError) else repr(exc)
                log.error("reload_failed", session_id=session.id, error=error)
                session.broken = Broken(public_reason(exc), damaged(exc))
                raise SessionBrokenError(
                    f"session {session.id!r} could not be reloaded from disk: "
                    f"{session.broken.reason}",
                    session_id=session.id,
                    damaged=session.broken.damaged,
                ) from None
            log.info("session_reloaded", session_id=session.id, step=session.step)

    def gauges(self) -> SessionGauges:
        """The session gauges /metrics serves. Runs in the metrics HTTP server's thread: reads
        only, copying containers before iterating."""
        sessions = list(self.sessions.values())
        on_disk = 0
        with contextlib.suppress(OSError):  # data dir gone: report what can be seen
            on_disk = len(self.store.scan()[0])
        return SessionGauges(
            known=len(sessions),
            resident=sum(1 for s in sessions if s.resident),
            on_disk=on_disk,
            unsaved=len(self.checkpoints.unsaved),
        )

    def session_points(self) -> list[SessionPoint]:
        """The per-session gauges /metrics serves, of every loadable session. Runs in the metrics
        HTTP server's thread: reads only, copying the dict before iterating."""
        return [
            SessionPoint(
                session_id=s.id,
                active=math.inf if s.busy else s.use.last_used,
                step=s.step,
                smoothed_loss=s.losses.smoothed_loss if s.step else None,
                validation_loss=s.losses.validation_loss if s.losses.validation_step else None,
            )
            for s in list(self.sessions.values())
            if s.broken is None
        ]

    # ----- create / delete / append -----------------------------------------------------

    def check_corpus_limits(self, session_bytes: int, added: int) -> None:
        """LimitExceededError when the corpus (UTF-8 bytes) would outgrow a limit."""
        total = sum(x.summary.corpus_bytes for x in self.sessions.values())
        check_corpus_limits(self.settings, session_bytes, added, total)

    def check_import(self, config: ModelConfig, alphabet: str, corpus_length: int) -> None:
        """The limits an archive or copy must meet, checked before its arrays are read:
        config limits, alphabet size, and the corpus length (a character is >= 1 byte)."""
        self.factory.check_config_limits(config)
        check_alphabet_size(self.settings, len(alphabet))
        self.check_corpus_limits(0, corpus_length)

    def _check_room_for(self, session_id: str) -> None:
        """Before a new session is made: ALREADY_EXISTS if the id is in use (or being
        created), RESOURCE_EXHAUSTED if max_sessions are there already."""
        if session_id in self.sessions or session_id in self.reserved:
            raise _exists(session_id)
        if len(self.sessions) + len(self.reserved) >= self.settings.max_sessions:
            raise limit_error(
                "the number of sessions",
                len(self.sessions) + 1,
                self.settings.max_sessions,
                "max_sessions",
            )

    async def create(
        self, session_id: str, config: ModelConfig, text: str, alphabet: str
    ) -> Session:
        """Make, persist and register a new session."""
        self.check_serving()
        if session_id:
            validate_session_id(session_id)
        else:
            session_id = "s-" + secrets.token_hex(6)
            while session_id in self.sessions or session_id in self.reserved:
                session_id = "s-" + secrets.token_hex(6)
        self._check_room_for(session_id)
        self.factory.check_config_limits(config)
        self.check_corpus_limits(0, utf8_size(text))
        alphabet_size = len(alphabet) if alphabet else len(set(text))
        needed = resident_bytes(config, alphabet_size, len(text))
        self.reserved.add(session_id)
        try:
            await self.residency.make_room(needed)
            with self.residency.reserving(needed):  # counted until the session itself is
                trainer = await self.run(self.factory.build_trainer, config, text, alphabet)
                session = Session.new(session_id, trainer)
                self.sessions[session_id] = session
        finally:
            self.reserved.discard(session_id)
        await self.checkpoints.flush(session)
        failed = self.checkpoints.unsaved.get(session_id)
        if failed is not None:
            # Never acknowledge a session that is not on disk: forget it and its files.
            if self.sessions.get(session_id) is session:
                del self.sessions[session_id]
            session.deleted = True
            self.checkpoints.mark_saved(session)
            with contextlib.suppress(Exception):
                await self.run_io(self._delete_file, session)
            log.error("create_not_saved", session_id=session_id, error=str(failed))
            raise type(failed)(str(failed))  # a fresh one: the stored error is raised again
        log.info(
            "session_created",
            session_id=session_id,
            corpus_chars=len(text),
            alphabet_size=len(session.summary.alphabet),
            parameters=session.summary.parameter_count,
        )
        self.residency.evict_over_limit()
        return session

    async def adopt(self, ckpt: Checkpoint, changes: dict[str, Any] | None = None) -> Session:
        """Register a new session made from a checkpoint held in memory (ImportSession,
        ForkSession) with ``changes`` to its settings, and persist it before returning."""
        self.check_serving()
        session_id = ckpt.session_id
        validate_session_id(session_id)
        self._check_room_for(session_id)
        self.reserved.add(session_id)
        try:
            if self.taken_elsewhere is not None and await self.taken_elsewhere(session_id):
                raise _exists(session_id)
            session = await self.run(self.factory.from_checkpoint, ckpt, changes or {})
            self.check_corpus_limits(0, session.summary.corpus_bytes)
            self.sessions[session_id] = session
        finally:
            self.reserved.discard(session_id)
        await self.checkpoints.flush(session)
        if session.unsaved_changes:
            # Never acknowledge a session that is not on disk: take it back.
            if self.sessions.get(session_id) is session:
                del self.sessions[session_id]
            session.deleted = True
            failed = self.checkpoints.unsaved.get(session_id)
            self.checkpoints.mark_saved(session)  # gone: health need not wait for it
            if self.taken_elsewhere is not None and await self.taken_elsewhere(session_id):
                raise _exists(session_id)  # created on another replica meanwhile
            if failed is not None:
                raise type(failed)(str(failed))  # a fresh one: the stored error is raised again
            raise CheckpointError(
                f"session {session_id!r} could not be written to disk, so it was not created; "
                "the server log has the reason"
            )
        log.info(
            "session_adopted",
            session_id=session_id,
            step=session.step,
            corpus_chars=session.summary.corpus_chars,
        )
        self.residency.evict_over_limit()
        return session

    async def delete(self, session_id: str) -> None:
        """Remove a session from memory and disk; a running Train stops, watch streams end."""
        self.check_serving()
        session = self.get(session_id)
        # Concurrent deletes of one session take turns: the first removes it, the others
        # then find it gone (NOT_FOUND), as if they had come after it.
        async with session.delete_lock:
            if self.sessions.get(session_id) is not session:
                raise _not_found(session_id)
            # All or nothing: the files go first; if they can't, the session stays as it was.
            try:
                await self.run_io(self._delete_file, session)
            except OSError as exc:
                log.error("delete_failed", session_id=session_id, error=repr(exc))
                raise storage_error(exc) from None
            if self.sessions.get(session_id) is session:
                del self.sessions[session_id]
        self.checkpoints.mark_saved(session)
        session.request_stop(StopCause.DELETED)
        session.close_watchers()
        log.info("session_deleted", session_id=session_id)

    def _delete_file(self, session: Session) -> None:
        with session.checkpoint.io_lock:
            self.store.delete(session.id)
            session.deleted = True  # under io_lock: no checkpoint write can follow

    async def append(self, session: Session, ids: np.ndarray, held: bool = False) -> None:
        """Append encoded text to a loaded session's corpus (marks it busy meanwhile, unless
        the caller ``held`` it between two chunks of its job)."""
        self.check_corpus_limits(
            session.summary.corpus_bytes, session.require_trainer().vocab.utf8_size(ids)
        )
        await self.checkpoints.check_writable(session)
        if not held:
            session.begin("AppendText")
        try:
            before = await self.run(session.append, ids)
            # Durable before acknowledged (a big, rare call): it waits for its checkpoint,
            # still busy so no update reads the text before it is kept or taken back.
            await self.checkpoints.flush(session)
            failed = self.checkpoints.unsaved.get(session.id)
            if failed is not None:
                await self.run(session.undo_append, before)
                raise type(failed)(str(failed))  # a fresh one: the stored error is raised again
        finally:
            if not held:
                session.end()


def _not_found(session_id: str) -> SessionNotFoundError:
    """NOT_FOUND for an id no session has."""
    return SessionNotFoundError(
        f"session {session_id!r} does not exist; ListSessions shows the existing ones",
        session_id=session_id,
    )


def _exists(session_id: str) -> SessionExistsError:
    """ALREADY_EXISTS for an id in use (here, or in cluster mode on another replica)."""
    return SessionExistsError(
        f"session {session_id!r} already exists; pick another id or delete it first",
        session_id=session_id,
    )
