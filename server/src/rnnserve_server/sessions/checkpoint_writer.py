"""Write-behind checkpoints: at most one write per session in flight, requests coalesced,
failures tracked (health goes NOT_SERVING while any session can't be saved)."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from concurrent.futures import Executor

from rnnserve_server import metrics
from rnnserve_server.errors import StorageError, StorageFullError
from rnnserve_server.logs import get_logger
from rnnserve_server.sessions.session import Session
from rnnserve_server.storage.store import Store

log = get_logger("rnnserve.registry")


def storage_error(exc: BaseException) -> StorageError:
    """The client's sentence for a failed checkpoint write or delete (no paths: the server log
    has those); StorageFullError when the disk is full. A StorageError (a LeaseLostError among
    them: in cluster mode another replica owns the session now) already says it."""
    if isinstance(exc, StorageError):
        return exc
    code = exc.errno if isinstance(exc, OSError) else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return StorageFullError(
            "the server's disk is full, so the change could not be saved; retry once the "
            "operator has freed space in its data directory"
        )
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StorageError(
            "the server's data directory is not writable, so the change could not be saved; "
            "the operator must make it writable, then retry"
        )
    return StorageError(
        "the server could not save to its data directory; retry later (the server log has "
        "the details)"
    )


class CheckpointWriter:
    """Write-behind checkpoints of sessions into a Store, and which sessions' writes failed.

    Writes run in the ``io`` executor. ``after_writes`` is called (on the event loop) whenever a
    session's writes finish, so its owner can act on what is now saved (the registry evicts).
    """

    def __init__(self, store: Store, io: Executor) -> None:
        self.store = store
        self.io = io
        # Sessions whose last checkpoint failed; while any is, health is NOT_SERVING.
        self.unsaved: dict[str, StorageError] = {}
        self.on_storage_change: Callable[[bool], None] | None = None  # called with ok
        self.after_writes: Callable[[], None] | None = None

    def request(self, session: Session) -> asyncio.Task[None]:
        """Write the session soon; the task finishes once every change so far is saved.

        Write-behind: at most one write per session is in flight; requests made meanwhile
        (a run of Steps) coalesce into one more write when it finishes. Train calls this
        every checkpoint_interval and at its end; Step, AppendText, create, eviction and
        shutdown after each change.
        """
        session.checkpoint.dirty = True
        task = session.checkpoint.task
        if task is None or task.done():
            task = asyncio.create_task(self._checkpoint_loop(session))
            session.checkpoint.task = task
        return task

    async def flush(self, session: Session) -> None:
        """Return once every change made so far is on disk (or failed, logged)."""
        if session.deleted or not session.resident:
            return
        if not session.unsaved_changes:
            task = session.checkpoint.task
            if task is not None and not task.done():
                await asyncio.shield(task)
            return
        await asyncio.shield(self.request(session))

    async def _checkpoint_loop(self, session: Session) -> None:
        while session.checkpoint.dirty and not session.deleted:
            session.checkpoint.dirty = False
            try:
                await asyncio.get_running_loop().run_in_executor(self.io, self._write, session)
            except Exception as exc:
                session.checkpoint.dirty = True
                log.error("checkpoint_failed", session_id=session.id, error=repr(exc))
                if not session.deleted:  # one gone meanwhile (a lease lost) has nothing to keep
                    self._mark_unsaved(session, storage_error(exc))
                return
            self.mark_saved(session)
        if self.after_writes is not None:
            self.after_writes()

    def _mark_unsaved(self, session: Session, error: StorageError) -> None:
        first = not self.unsaved
        self.unsaved[session.id] = error
        session.checkpoint.error = str(error)
        if first:
            log.error("storage_failing", error=str(error))
            if self.on_storage_change is not None:
                self.on_storage_change(False)

    def mark_saved(self, session: Session) -> None:
        """The session has nothing unsaved (written, or gone with its files)."""
        session.checkpoint.error = None
        self.forget_failure(session.id)

    def forget_failure(self, session_id: str, **why: str) -> None:
        """Forget the session's failed write; health turns SERVING again if it was the last."""
        if self.unsaved.pop(session_id, None) is not None and not self.unsaved:
            log.info("storage_recovered", **why)
            if self.on_storage_change is not None:
                self.on_storage_change(True)

    async def check_writable(self, session: Session) -> None:
        """Before a change: if the session's last checkpoint failed, try again now, and raise
        its StorageError if it still fails (a change that can't be kept is refused)."""
        if session.id not in self.unsaved:
            return
        await self.flush(session)
        failed = self.unsaved.get(session.id)
        if failed is not None:
            raise type(failed)(str(failed))  # a fresh one: the stored error is raised again

    def _write(self, session: Session) -> None:
        if self.store.ensure_dirs():
            log.error(
                "data_dir_recreated",
                data_dir=self.store.location,
                error="the data directory was deleted while the server ran; sessions not in "
                "memory were lost with it",
            )
        # The corpus file may have gone with a deleted directory: write it again.
        if session.checkpoint.corpus_on_disk is not None and not self.store.has_corpus(session.id):
            session.checkpoint.corpus_on_disk = None
        ckpt = session.snapshot()
        if ckpt is None:
            return
        with session.checkpoint.io_lock:
            if session.deleted:  # never resurrect a deleted session's file
                return
            started = time.perf_counter()
            try:
                size = self.store.save(ckpt)
            except BaseException:
                metrics.record_checkpoint(time.perf_counter() - started, ok=False)
                raise
            metrics.record_checkpoint(time.perf_counter() - started)
            session.checkpoint.corpus_on_disk = ckpt.corpus
        session.checkpoint.step = int(ckpt.meta["step"])
        log.debug(
            "checkpoint_written",
            session_id=session.id,
            step=session.checkpoint.step,
            corpus_chars=ckpt.corpus.length if ckpt.corpus is not None else None,
            bytes=size,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
