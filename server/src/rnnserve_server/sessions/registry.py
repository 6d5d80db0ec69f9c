"""id -> Session: the directory of a server's sessions: creation, lookup, deletion, loading.

Checkpoint writes are checkpoints.py's, eviction residency.py's, limits limits.py's.

All methods run on the event loop; blocking work (model set-up, disk I/O) goes to executors.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from rnnserve_server.config import Settings
from rnnserve_server.engine.trainer import (
    ModelConfig,
)
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
from rnnserve_server.metrics import SessionGauges
from rnnserve_server.sessions.checkpoint_writer import CheckpointWriter, storage_error
from rnnserve_server.sessions.factory import SessionFactory, _damaged, _public_reason
from rnnserve_server.sessions.limits import (
    check_corpus_limits,
    limit_error,
)
from rnnserve_server.sessions.residency import Residency, _session_bytes, resident_bytes
from rnnserve_server.sessions.session import Session, StopCause
from rnnserve_server.storage.store import Checkpoint, Store, validate_session_id

log = get_logger("rnnserve.registry")

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class Registry(SessionFactory, Residency, CheckpointWriter):
    """The sessions of one server and the data directory behind them."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.sessions: dict[str, Session] = {}
        self._reserved: set[str] = set()  # ids being created
        self._pending_bytes = 0  # resident_bytes of the sessions being created
        self.shutting_down = False
        # Training and sampling run here; disk I/O has its own pool so checkpoints never queue
        # behind long training chunks.
        self.compute = ThreadPoolExecutor(max_workers=32, thread_name_prefix="rnnserve-compute")
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rnnserve-io")
        self._evictor: asyncio.Task[None] | None = None
        # Sessions whose last checkpoint failed; while any is, health is NOT_SERVING.
        self.unsaved: dict[str, StorageError] = {}
        self.on_storage_change: Callable[[bool], None] | None = None  # called with ok
        # Cluster mode: True if an id not in this registry is taken by a session kept
        # elsewhere (another replica, the shared directory); None in one process.
        self.taken_elsewhere: Callable[[str], Awaitable[bool]] | None = None

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
            session = await self.run_io(self._load_new, session_id)
            self.sessions[session_id] = session
            if session.broken_error is not None:
                broken += 1
            elif (
                self._resident_count() > self.settings.max_resident_sessions
                or self._resident_bytes() > self.settings.max_resident_bytes
            ):
                session.evict()
        log.info(
            "sessions_loaded",
            sessions=len(self.sessions),
            broken=broken,
            resident=self._resident_count(),
            data_dir=self.store.location,
        )
        self._evictor = asyncio.create_task(self._evict_loop())

    def begin_shutdown(self) -> None:
        """Refuse new work, stop running Trains and end watch streams."""
        self.shutting_down = True
        for session in self.sessions.values():
            if session.busy == "Train":
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
            *(self.flush(s) for s in list(self.sessions.values()) if s.resident),
            return_exceptions=True,
        )
        unsaved = sorted(
            s.id
            for s in self.sessions.values()
            if s.resident and (s.dirty or s.checkpointed_step != s.step)
        )
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
            raise SessionNotFoundError(
                f"session {session_id!r} does not exist; ListSessions shows the existing ones",
                session_id=session_id,
            )
        return session

    @contextlib.asynccontextmanager
    async def use(self, session_id: str) -> AsyncIterator[Session]:
        """A loaded, non-broken session, kept resident until the block ends."""
        self.check_serving()
        session = self.get(session_id)
        session.users += 1
        try:
            await self._ensure_loaded(session)
            session.last_used = time.monotonic()
            yield session
        finally:
            session.users -= 1
            session.last_used = time.monotonic()
        self._evict_over_limit(keep=session)

    async def _ensure_loaded(self, session: Session) -> None:
        if session.resident:
            return
        if session.broken_error is not None:
            session.require_trainer()  # raises SessionBrokenError
        async with session.load_lock:
            if session.resident:
                return
            await self.make_room(_session_bytes(session), keep=session)
            try:
                ckpt = await self.run_io(self.store.load, session.id, self._check_checkpoint)
                await self.run(session.attach, ckpt)
            except Exception as exc:
                error = str(exc) if isinstance(exc, CheckpointError) else repr(exc)
                log.error("reload_failed", session_id=session.id, error=error)
                session.broken_error = _public_reason(exc)
                session.broken_damaged = _damaged(exc)
                raise SessionBrokenError(
                    f"session {session.id!r} could not be reloaded from disk: "
                    f"{session.broken_error}",
                    session_id=session.id,
                    damaged=session.broken_damaged,
                ) from None
            log.info("session_reloaded", session_id=session.id, step=session.step)

    def gauges(self) -> SessionGauges:
        """The session gauges of metrics.py. Runs in the metrics HTTP server's thread: reads
        only, copying containers before iterating."""
        sessions = list(self.sessions.values())
        on_disk = 0
        with contextlib.suppress(OSError):  # data dir gone: report what can be seen
            on_disk = len(self.store.scan()[0])
        return SessionGauges(
            known=len(sessions),
            resident=sum(1 for s in sessions if s.resident),
            on_disk=on_disk,
            unsaved=len(self.unsaved),
        )

    # ----- create / delete / append -----------------------------------------------------

    def check_corpus_limits(self, session_bytes: int, added: int) -> None:
        """LimitExceededError when the corpus (UTF-8 bytes) would outgrow a limit."""
        total = sum(x.summary.corpus_bytes for x in self.sessions.values())
        check_corpus_limits(self.settings, session_bytes, added, total)

    async def create(
        self, session_id: str, config: ModelConfig, text: str, alphabet: str
    ) -> Session:
        """Make, persist and register a new session."""
        self.check_serving()
        if session_id:
            validate_session_id(session_id)
        else:
            session_id = "s-" + secrets.token_hex(6)
            while session_id in self.sessions or session_id in self._reserved:
                session_id = "s-" + secrets.token_hex(6)
        if session_id in self.sessions or session_id in self._reserved:
            raise _exists(session_id)
        if len(self.sessions) + len(self._reserved) >= self.settings.max_sessions:
            raise limit_error(
                "the number of sessions",
                len(self.sessions) + 1,
                self.settings.max_sessions,
                "max_sessions",
            )
        self.check_config_limits(config)
        self.check_corpus_limits(0, utf8_size(text))
        alphabet_size = len(alphabet) if alphabet else len(set(text))
        needed = resident_bytes(config, alphabet_size, len(text))
        self._reserved.add(session_id)
        try:
            await self.make_room(needed)
            self._pending_bytes += needed  # counted until the session itself is
            try:
                trainer = await self.run(self._build_trainer, config, text, alphabet)
                session = Session.new(session_id, trainer)
                self.sessions[session_id] = session
            finally:
                self._pending_bytes -= needed
        finally:
            self._reserved.discard(session_id)
        await self.flush(session)
        failed = self.unsaved.get(session_id)
        if failed is not None:
            # Never acknowledge a session that is not on disk: forget it and its files.
            if self.sessions.get(session_id) is session:
                del self.sessions[session_id]
            session.deleted = True
            self._mark_saved(session)
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
        self._evict_over_limit()
        return session

    async def adopt(self, ckpt: Checkpoint, changes: dict[str, Any] | None = None) -> Session:
        """Register a new session made from a checkpoint held in memory (ImportSession,
        ForkSession) with ``changes`` to its settings, and persist it before returning."""
        self.check_serving()
        session_id = ckpt.session_id
        validate_session_id(session_id)
        if session_id in self.sessions or session_id in self._reserved:
            raise _exists(session_id)
        if len(self.sessions) + len(self._reserved) >= self.settings.max_sessions:
            raise limit_error(
                "the number of sessions",
                len(self.sessions) + 1,
                self.settings.max_sessions,
                "max_sessions",
            )
        if self.taken_elsewhere is not None and await self.taken_elsewhere(session_id):
            raise _exists(session_id)
        self._reserved.add(session_id)
        try:
            session = await self.run(self._session_from, ckpt, changes or {})
            self.check_corpus_limits(0, session.summary.corpus_bytes)
            self.sessions[session_id] = session
        finally:
            self._reserved.discard(session_id)
        await self.flush(session)
        if session.dirty or session.checkpointed_step != session.step:
            # Never acknowledge a session that is not on disk: take it back.
            self.sessions.pop(session_id, None)
            session.deleted = True
            if self.taken_elsewhere is not None and await self.taken_elsewhere(session_id):
                raise _exists(session_id)  # created on another replica meanwhile
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
        self._evict_over_limit()
        return session

    async def delete(self, session_id: str) -> None:
        """Remove a session from memory and disk; a running Train stops, watch streams end."""
        self.check_serving()
        session = self.get(session_id)
        # All or nothing: the files go first; if they can't, the session stays as it was.
        try:
            await self.run_io(self._delete_file, session)
        except OSError as exc:
            log.error("delete_failed", session_id=session_id, error=repr(exc))
            raise storage_error(exc) from None
        if self.sessions.get(session_id) is session:
            del self.sessions[session_id]
        self._mark_saved(session)
        session.request_stop(StopCause.DELETED)
        session.close_watchers()
        log.info("session_deleted", session_id=session_id)

    def _delete_file(self, session: Session) -> None:
        with session.io_lock:
            self.store.delete(session.id)
            session.deleted = True  # under io_lock: no checkpoint write can follow

    async def append(self, session: Session, ids: np.ndarray) -> None:
        """Append encoded text to a loaded session's corpus (marks it busy meanwhile)."""
        self.check_corpus_limits(
            session.summary.corpus_bytes, session.require_trainer().vocab.utf8_size(ids)
        )
        await self.check_writable(session)
        session.begin("AppendText")
        try:
            before = await self.run(session.append, ids)
            # Durable before acknowledged (a big, rare call): it waits for its checkpoint,
            # still busy so no update reads the text before it is kept or taken back.
            await self.flush(session)
            failed = self.unsaved.get(session.id)
            if failed is not None:
                await self.run(session.undo_append, before)
                raise type(failed)(str(failed))  # a fresh one: the stored error is raised again
        finally:
            session.end()


def _exists(session_id: str) -> SessionExistsError:
    """ALREADY_EXISTS for an id in use (here, or in cluster mode on another replica)."""
    return SessionExistsError(
        f"session {session_id!r} already exists; pick another id or delete it first",
        session_id=session_id,
    )
