"""id -> Session: creation, lookup, paging, deletion, limits, loading, checkpoints, eviction.

All methods run on the event loop; blocking work (model set-up, disk I/O) goes to executors.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from rnnserve_server.config import Settings
from rnnserve_server.errors import (
    CheckpointError,
    InvalidArgumentError,
    LimitExceededError,
    SessionBrokenError,
    SessionExistsError,
    SessionNotFoundError,
    ShuttingDownError,
)
from rnnserve_server.logs import get_logger
from rnnserve_server.model import ModelConfig, Trainer
from rnnserve_server.session import Session, StopCause
from rnnserve_server.store import Store, validate_session_id
from rnnserve_server.vocab import Vocab, utf8_size

log = get_logger("rnnserve.registry")

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def limit_message(what: str, value: int, limit: int, setting: str) -> str:
    """A RESOURCE_EXHAUSTED sentence naming the limit and the setting that raises it."""
    env = "RNNSERVE_" + setting.upper()
    flag = "--" + setting.replace("_", "-")
    return (
        f"{what} ({value}) exceeds the server limit of {limit}; "
        f"the operator can raise it with {flag} or {env}"
    )


class Registry:
    """The sessions of one server and the data directory behind them."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.sessions: dict[str, Session] = {}
        self._reserved: set[str] = set()  # ids being created
        self.shutting_down = False
        # Training and sampling run here; disk I/O has its own pool so checkpoints never queue
        # behind long training chunks.
        self.compute = ThreadPoolExecutor(max_workers=32, thread_name_prefix="rnnserve-compute")
        self.io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rnnserve-io")
        self._evictor: asyncio.Task[None] | None = None

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
        ids, ignored = await self.run_io(self.store.scan)
        if ignored:
            log.warning("ignored_files", directory=str(self.store.sessions_dir), files=ignored[:20])
        broken = 0
        for session_id in ids:
            session = await self.run_io(self._load_new, session_id)
            self.sessions[session_id] = session
            if session.broken_error is not None:
                broken += 1
            elif self._resident_count() > self.settings.max_resident_sessions:
                session.evict()
        log.info(
            "sessions_loaded",
            sessions=len(self.sessions),
            broken=broken,
            resident=self._resident_count(),
            data_dir=str(self.store.data_dir),
        )
        self._evictor = asyncio.create_task(self._evict_loop())

    def _load_new(self, session_id: str) -> Session:
        try:
            return Session.from_checkpoint(self.store.load(session_id))
        except Exception as exc:  # a bad file must never stop the server
            error = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
            log.error("checkpoint_broken", session_id=session_id, error=error)
            try:
                mtime = self.store.path(session_id).stat().st_mtime
            except OSError:
                mtime = time.time()
            return Session.broken(session_id, error, mtime)

    def begin_shutdown(self) -> None:
        """Refuse new work, stop running Trains and end watch streams."""
        self.shutting_down = True
        for session in self.sessions.values():
            if session.busy == "Train":
                session.request_stop(StopCause.SHUTDOWN)
            session.close_watchers()

    async def close(self) -> None:
        """Checkpoint every session with unsaved changes, then release the data directory."""
        if self._evictor is not None:
            self._evictor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._evictor
        await asyncio.gather(
            *(self.flush(s) for s in list(self.sessions.values()) if s.resident),
            return_exceptions=True,
        )
        self.compute.shutdown(wait=True, cancel_futures=True)
        self.io.shutdown(wait=True)
        self.store.close()

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
                f"session {session_id!r} does not exist; ListSessions shows the existing ones"
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
            try:
                ckpt = await self.run_io(self.store.load, session.id)
                await self.run(session.attach, ckpt)
            except Exception as exc:
                error = str(exc) if isinstance(exc, CheckpointError) else repr(exc)
                log.error("reload_failed", session_id=session.id, error=error)
                session.broken_error = error
                raise SessionBrokenError(
                    f"session {session.id!r} could not be reloaded from disk: {error}"
                ) from None
            log.info("session_reloaded", session_id=session.id, step=session.step)

    def page(self, page_size: int, page_token: str) -> tuple[list[Session], str, int]:
        """One page of sessions ordered by id: (sessions, next_page_token, total)."""
        if page_size < 0:
            raise InvalidArgumentError(f"page_size must be >= 0 (0 means {DEFAULT_PAGE_SIZE})")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = ""
        if page_token:
            try:
                after = base64.urlsafe_b64decode(page_token.encode("ascii")).decode("ascii")
                if not after.startswith("a:"):
                    raise ValueError(page_token)
                after = after[2:]
            except (ValueError, UnicodeError, binascii.Error):
                raise InvalidArgumentError(
                    "page_token is not one this server issued; pass the previous response's "
                    "next_page_token, or empty for the first page"
                ) from None
        ids = sorted(i for i in self.sessions if i > after)
        chosen = ids[:size]
        token = ""
        if len(ids) > size:
            token = base64.urlsafe_b64encode(("a:" + chosen[-1]).encode("ascii")).decode("ascii")
        return [self.sessions[i] for i in chosen], token, len(self.sessions)

    # ----- create / delete / append -----------------------------------------------------

    def check_config_limits(self, config: ModelConfig) -> None:
        """LimitExceededError when a hyperparameter is over its server limit."""
        s = self.settings
        for field, limit_name in (
            ("hidden_size", "max_hidden_size"),
            ("batch_size", "max_batch_size"),
            ("seq_length", "max_seq_length"),
            ("num_layers", "max_num_layers"),
        ):
            value, limit = getattr(config, field), getattr(s, limit_name)
            if value > limit:
                raise LimitExceededError(limit_message(field, value, limit, limit_name))
        if config.recurrent_weights > s.max_recurrent_weights:
            raise LimitExceededError(
                limit_message(
                    "recurrent weights (num_layers x gates x hidden_size^2, x2 above layer 1)",
                    config.recurrent_weights,
                    s.max_recurrent_weights,
                    "max_recurrent_weights",
                )
            )
        window = config.batch_size * config.seq_length
        if window > s.max_window_chars:
            raise LimitExceededError(
                limit_message(
                    "batch_size x seq_length", window, s.max_window_chars, "max_window_chars"
                )
            )

    def check_corpus_limits(self, session_bytes: int, added: int) -> None:
        """LimitExceededError when the corpus (UTF-8 bytes) would outgrow a limit."""
        s = self.settings
        if session_bytes + added > s.max_corpus_bytes:
            raise LimitExceededError(
                limit_message(
                    "the session's corpus in UTF-8 bytes",
                    session_bytes + added,
                    s.max_corpus_bytes,
                    "max_corpus_bytes",
                )
            )
        total = sum(x.summary.corpus_bytes for x in self.sessions.values()) + added
        if total > s.max_total_corpus_bytes:
            raise LimitExceededError(
                limit_message(
                    "the corpus bytes of all sessions",
                    total,
                    s.max_total_corpus_bytes,
                    "max_total_corpus_bytes",
                )
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
            while session_id in self.sessions or session_id in self._reserved:
                session_id = "s-" + secrets.token_hex(6)
        if session_id in self.sessions or session_id in self._reserved:
            raise SessionExistsError(
                f"session {session_id!r} already exists; pick another id or delete it first"
            )
        if len(self.sessions) + len(self._reserved) >= self.settings.max_sessions:
            raise LimitExceededError(
                limit_message(
                    "the number of sessions",
                    len(self.sessions) + 1,
                    self.settings.max_sessions,
                    "max_sessions",
                )
            )
        self.check_config_limits(config)
        self.check_corpus_limits(0, utf8_size(text))
        self._reserved.add(session_id)
        try:
            trainer = await self.run(self._build_trainer, config, text, alphabet)
            session = Session.new(session_id, trainer)
            self.sessions[session_id] = session
        finally:
            self._reserved.discard(session_id)
        await self.flush(session)
        log.info(
            "session_created",
            session_id=session_id,
            corpus_chars=len(text),
            alphabet_size=len(session.summary.alphabet),
            parameters=session.summary.parameter_count,
        )
        self._evict_over_limit()
        return session

    def _build_trainer(self, config: ModelConfig, text: str, alphabet: str) -> Trainer:
        try:
            vocab = Vocab(alphabet) if alphabet else Vocab.from_text(text)
        except ValueError as exc:
            raise InvalidArgumentError(f"alphabet is invalid: {exc}") from None
        if vocab.size > self.settings.max_alphabet_size:
            raise LimitExceededError(
                limit_message(
                    "the alphabet size",
                    vocab.size,
                    self.settings.max_alphabet_size,
                    "max_alphabet_size",
                )
            )
        ids = vocab.encode(text)
        return Trainer(config, vocab, ids)

    async def delete(self, session_id: str) -> None:
        """Remove a session from memory and disk; a running Train stops, watch streams end."""
        self.check_serving()
        session = self.get(session_id)
        del self.sessions[session_id]
        session.deleted = True
        session.request_stop(StopCause.DELETED)
        session.close_watchers()
        await self.run_io(self._delete_file, session)
        log.info("session_deleted", session_id=session_id)

    def _delete_file(self, session: Session) -> None:
        with session.io_lock:
            self.store.delete(session.id)

    async def append(self, session: Session, ids: np.ndarray) -> None:
        """Append encoded text to a loaded session's corpus (marks it busy meanwhile)."""
        self.check_corpus_limits(
            session.summary.corpus_bytes, session.require_trainer().vocab.utf8_size(ids)
        )
        session.begin("AppendText")
        try:
            await self.run(session.append, ids)
        finally:
            session.end()
        self.request_checkpoint(session)

    # ----- checkpoints ------------------------------------------------------------------

    def request_checkpoint(self, session: Session) -> asyncio.Task[None]:
        """Write the session soon; the task finishes once every change so far is saved.

        Write-behind: at most one write per session is in flight; requests made meanwhile
        (a run of Steps) coalesce into one more write when it finishes. Train calls this
        every checkpoint_interval and at its end; Step, AppendText, create, eviction and
        shutdown after each change.
        """
        session.dirty = True
        task = session.checkpoint_task
        if task is None or task.done():
            task = asyncio.create_task(self._checkpoint_loop(session))
            session.checkpoint_task = task
        return task

    async def flush(self, session: Session) -> None:
        """Return once every change made so far is on disk (or failed, logged)."""
        if session.deleted or not session.resident:
            return
        if not session.dirty and session.checkpointed_step == session.step:
            task = session.checkpoint_task
            if task is not None and not task.done():
                await asyncio.shield(task)
            return
        await asyncio.shield(self.request_checkpoint(session))

    async def _checkpoint_loop(self, session: Session) -> None:
        while session.dirty and not session.deleted:
            session.dirty = False
            try:
                await self.run_io(self._write, session)
            except Exception as exc:
                session.dirty = True
                log.error("checkpoint_failed", session_id=session.id, error=repr(exc))
                return
        if not self.shutting_down:
            self._evict_over_limit()

    def _write(self, session: Session) -> None:
        ckpt = session.snapshot()
        if ckpt is None:
            return
        with session.io_lock:
            if session.deleted:  # never resurrect a deleted session's file
                return
            started = time.perf_counter()
            size = self.store.save(ckpt)
            session.corpus_on_disk = ckpt.corpus
        session.checkpointed_step = int(ckpt.meta["step"])
        log.debug(
            "checkpoint_written",
            session_id=session.id,
            step=session.checkpointed_step,
            corpus_chars=ckpt.corpus.length if ckpt.corpus is not None else None,
            bytes=size,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )

    # ----- eviction ---------------------------------------------------------------------

    def _resident_count(self) -> int:
        return sum(1 for s in self.sessions.values() if s.resident)

    def _evict_over_limit(self, keep: Session | None = None) -> None:
        """Evict least recently used sessions beyond max_resident_sessions (never ``keep``).

        A session with unsaved changes is checkpointed first; the checkpoint calls this again.
        """
        if len(self.sessions) <= self.settings.max_resident_sessions:
            return  # nothing to evict; skips an O(sessions) count on every call
        excess = self._resident_count() - self.settings.max_resident_sessions
        if excess <= 0:
            return
        lru = sorted(
            (s for s in self.sessions.values() if s.resident and s is not keep),
            key=lambda s: s.last_used,
        )
        for session in lru:
            if excess <= 0:
                break
            if session.dirty or session.checkpointed_step != session.step:
                task = session.checkpoint_task
                if task is None or task.done():
                    self.request_checkpoint(session)  # evictable once written
                continue
            if session.evict():
                excess -= 1
                log.info("session_evicted", session_id=session.id, reason="max_resident_sessions")

    async def _evict_loop(self) -> None:
        idle = self.settings.idle_evict_seconds
        period = min(max(idle / 4, 0.05), 30.0) if idle > 0 else 30.0
        while True:
            await asyncio.sleep(period)
            if idle > 0:
                cutoff = time.monotonic() - idle
                for session in list(self.sessions.values()):
                    if session.resident and session.last_used < cutoff:
                        if session.dirty:
                            self.request_checkpoint(session)
                        elif session.evict():
                            log.info("session_evicted", session_id=session.id, reason="idle")
            self._evict_over_limit()
