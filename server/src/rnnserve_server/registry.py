"""id -> Session: creation, lookup, paging, deletion, limits, loading, checkpoints, eviction.

All methods run on the event loop; blocking work (model set-up, disk I/O) goes to executors.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import secrets
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from rnnserve_server import budget
from rnnserve_server.config import Settings
from rnnserve_server.errors import (
    CheckpointError,
    InvalidArgumentError,
    LimitExceededError,
    SessionBrokenError,
    SessionExistsError,
    SessionNotFoundError,
    ShuttingDownError,
    StorageError,
    StorageFullError,
)
from rnnserve_server.logs import get_logger
from rnnserve_server.model import (
    EngineError,
    ModelConfig,
    Trainer,
    param_shapes,
    parameter_total,
)
from rnnserve_server.session import Session, StopCause
from rnnserve_server.store import Checkpoint, Store, validate_session_id
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


def storage_error(exc: BaseException) -> StorageError:
    """The client's sentence for a failed checkpoint write or delete (no paths: the server log
    has those); StorageFullError when the disk is full."""
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


_OPTIMIZER_SLOTS = {"sgd": 0, "adagrad": 1, "adam": 2}  # state arrays the size of the weights


def resident_bytes(config: ModelConfig, vocab_size: int, corpus_chars: int) -> int:
    """What a session's trainer holds in memory at most, for --max-resident-bytes: weights,
    optimizer state, gradient and proposed weights (update scratch), one window's workspace
    (inputs, hidden states and probabilities of every strand and step, forward and backward),
    the carried hidden states and the corpus ids."""
    V, H = vocab_size, config.hidden_size
    B, T = config.batch_size, config.seq_length
    item = np.dtype(config.dtype).itemsize
    parameters = parameter_total(config, V)
    H = budget.width(config)  # a gated or stacked model's per-step state: gates x layers x H
    weights = parameters * item * (3 + _OPTIMIZER_SLOTS.get(config.optimizer, 2))
    window = 3 * B * (T + 1) * (H + V) * item
    id_bytes = 1 if V <= 256 else 2 if V <= 65536 else 4
    return weights + window + B * H * item + corpus_chars * id_bytes


def _session_bytes(session: Session) -> int:
    summary = session.summary
    if summary.config is None:
        return 0
    return resident_bytes(summary.config, len(summary.alphabet), summary.corpus_chars)


def _damaged(exc: BaseException) -> bool:
    """Whether a load failure means the file is unreadable or damaged (DATA_LOSS), not only
    refused by this server's limits (a CheckpointError with ``damaged=False``)."""
    return not isinstance(exc, CheckpointError) or exc.damaged


def limit_error(what: str, value: int, limit: int, setting: str) -> LimitExceededError:
    """LimitExceededError with ``limit_message``'s sentence and the details' fields."""
    return LimitExceededError(
        limit_message(what, value, limit, setting), setting=setting, limit=limit, value=value
    )


def _public_reason(exc: BaseException) -> str:
    """Why a checkpoint can't be loaded, as clients see it: a sentence without paths or
    exception text (those go to the server log)."""
    if isinstance(exc, CheckpointError):
        return exc.public
    return "its checkpoint could not be loaded (the server log has the details)"


def page_token_after(session_id: str) -> str:
    """The ListSessions page token of the page that starts after ``session_id``."""
    return base64.urlsafe_b64encode(("a:" + session_id).encode("ascii")).decode("ascii")


class Registry:
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
            log.warning("ignored_files", directory=str(self.store.sessions_dir), files=ignored[:20])
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
            data_dir=str(self.store.data_dir),
        )
        self._evictor = asyncio.create_task(self._evict_loop())

    def _load_new(self, session_id: str) -> Session:
        try:
            return Session.from_checkpoint(self.store.load(session_id, self._check_checkpoint))
        except Exception as exc:  # a bad file must never stop the server
            error = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
            log.error("checkpoint_broken", session_id=session_id, error=error)
            try:
                mtime = self.store.path(session_id).stat().st_mtime
            except OSError:
                mtime = time.time()
            return Session.broken(session_id, _public_reason(exc), mtime, _damaged(exc))

    def _check_checkpoint(
        self, trainer_meta: dict[str, Any], shapes: dict[str, tuple[int, ...]]
    ) -> None:
        """Refuse a checkpoint whose model is over this server's limits, or whose arrays are
        not the shapes its config implies, before anything is allocated (CheckpointError)."""
        try:
            config = ModelConfig.from_dict(dict(trainer_meta["config"]))
            alphabet = str(trainer_meta["alphabet"])
        except (EngineError, KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"bad model config in the checkpoint ({exc})",
                public="its checkpoint's model config is invalid",
            ) from None
        try:
            self.check_config_limits(config)
            if len(alphabet) > self.settings.max_alphabet_size:
                raise limit_error(
                    "the alphabet size",
                    len(alphabet),
                    self.settings.max_alphabet_size,
                    "max_alphabet_size",
                )
        except LimitExceededError as exc:
            raise CheckpointError(
                f"checkpoint over this server's limits: {exc}",
                public=f"its model is larger than this server allows: {exc}",
                damaged=False,
            ) from None
        V, H, B = len(alphabet), config.hidden_size, config.batch_size
        expected = dict(param_shapes(V, H))
        tanh_rnn = set(expected) <= set(shapes)  # the seed's cell: every shape is known
        expected.update(hidden=(B, H), cursors=(B,))
        parameters = sum(int(np.prod(shape)) for shape in expected.values())
        if not tanh_rnn:  # other cells and layers: at most 4 gates of (H + V + 1) x (H + V)
            raw = trainer_meta["config"]
            layers = max(int(raw.get("layers", 1) or 1), int(raw.get("num_layers", 1) or 1))
            parameters = 4 * layers * (H + V + 1) * (H + V) + 2 * layers * B * H
        for name, shape in shapes.items():
            want = expected.get(name) if tanh_rnn else None
            if name == "corpus":
                continue  # version 1: its length is bounded by the file's size
            # Optimizer state (unnamed here): at most one value per parameter.
            ok = int(np.prod(shape)) <= parameters if want is None else shape == want
            if not ok:
                raise CheckpointError(
                    f"checkpoint array {name!r} has shape {shape}, which its config "
                    f"(alphabet {V}, hidden {H}, batch {B}) does not allow",
                    public="its checkpoint is damaged (array shapes do not match its config)",
                )

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
        token = page_token_after(chosen[-1]) if len(ids) > size else ""
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
                raise limit_error(field, value, limit, limit_name)
        if config.recurrent_weights > s.max_recurrent_weights:
            raise limit_error(
                "recurrent weights (num_layers x gates x hidden_size^2, x2 above layer 1)",
                config.recurrent_weights,
                s.max_recurrent_weights,
                "max_recurrent_weights",
            )
        window = config.batch_size * config.seq_length
        if window > s.max_window_chars:
            raise limit_error(
                "batch_size x seq_length", window, s.max_window_chars, "max_window_chars"
            )

    def check_corpus_limits(self, session_bytes: int, added: int) -> None:
        """LimitExceededError when the corpus (UTF-8 bytes) would outgrow a limit."""
        s = self.settings
        if session_bytes + added > s.max_corpus_bytes:
            raise limit_error(
                "the session's corpus in UTF-8 bytes",
                session_bytes + added,
                s.max_corpus_bytes,
                "max_corpus_bytes",
            )
        total = sum(x.summary.corpus_bytes for x in self.sessions.values()) + added
        if total > s.max_total_corpus_bytes:
            raise limit_error(
                "the corpus bytes of all sessions",
                total,
                s.max_total_corpus_bytes,
                "max_total_corpus_bytes",
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
                f"session {session_id!r} already exists; pick another id or delete it first",
                session_id=session_id,
            )
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

    def check_import(self, config: ModelConfig, alphabet: str, corpus_length: int) -> None:
        """The limits an archive or copy must meet, checked before its arrays are read:
        config limits, alphabet size, and the corpus length (a character is >= 1 byte)."""
        self.check_config_limits(config)
        if len(alphabet) > self.settings.max_alphabet_size:
            raise limit_error(
                "the alphabet size",
                len(alphabet),
                self.settings.max_alphabet_size,
                "max_alphabet_size",
            )
        self.check_corpus_limits(0, corpus_length)

    async def adopt(self, ckpt: Checkpoint, changes: dict[str, Any] | None = None) -> Session:
        """Register a new session made from a checkpoint held in memory (ImportSession,
        ForkSession) with ``changes`` to its settings, and persist it before returning."""
        self.check_serving()
        session_id = ckpt.session_id
        validate_session_id(session_id)
        if session_id in self.sessions or session_id in self._reserved:
            raise SessionExistsError(
                f"session {session_id!r} already exists; pick another id or delete it first",
                session_id=session_id,
            )
        if len(self.sessions) + len(self._reserved) >= self.settings.max_sessions:
            raise limit_error(
                "the number of sessions",
                len(self.sessions) + 1,
                self.settings.max_sessions,
                "max_sessions",
            )
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

    def _session_from(self, ckpt: Checkpoint, changes: dict[str, Any]) -> Session:
        try:
            session = Session.from_checkpoint(ckpt)
            if changes:
                session.reconfigure(changes)
        except (EngineError, ValueError, TypeError) as exc:
            raise InvalidArgumentError(f"the session state is invalid: {exc}") from None
        trainer = session.require_trainer()
        if trainer.cursors.size and (
            int(trainer.cursors.min()) < 0 or int(trainer.cursors.max()) > trainer.train_length
        ):
            raise InvalidArgumentError(
                f"the session state is invalid: its strand cursors lie outside the "
                f"{trainer.train_length} characters trained on"
            )
        session.create_time = session.update_time = time.time()
        session.corpus_on_disk = None  # nothing on disk yet: the first write has it all
        session.checkpointed_step = -1
        session.dirty = True
        return session

    def _build_trainer(self, config: ModelConfig, text: str, alphabet: str) -> Trainer:
        try:
            vocab = Vocab(alphabet) if alphabet else Vocab.from_text(text)
        except ValueError as exc:
            raise InvalidArgumentError(f"alphabet is invalid: {exc}") from None
        if vocab.size > self.settings.max_alphabet_size:
            raise limit_error(
                "the alphabet size",
                vocab.size,
                self.settings.max_alphabet_size,
                "max_alphabet_size",
            )
        ids = vocab.encode(text)
        return Trainer(config, vocab, ids)

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
                self._mark_unsaved(session, storage_error(exc))
                return
            self._mark_saved(session)
        if not self.shutting_down:
            self._evict_over_limit()

    def _mark_unsaved(self, session: Session, error: StorageError) -> None:
        first = not self.unsaved
        self.unsaved[session.id] = error
        session.checkpoint_error = str(error)
        if first:
            log.error("storage_failing", error=str(error))
            if self.on_storage_change is not None:
                self.on_storage_change(False)

    def _mark_saved(self, session: Session) -> None:
        session.checkpoint_error = None
        if self.unsaved.pop(session.id, None) is not None and not self.unsaved:
            log.info("storage_recovered")
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
                data_dir=str(self.store.data_dir),
                error="the data directory was deleted while the server ran; sessions not in "
                "memory were lost with it",
            )
        # The corpus file may have gone with a deleted directory: write it again.
        if session.corpus_on_disk is not None and not self.store.corpus_path(session.id).exists():
            session.corpus_on_disk = None
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

    async def make_room(self, needed: int, keep: Session | None = None) -> None:
        """Evict least recently used idle sessions until ``needed`` more bytes fit within
        max_resident_bytes; LimitExceededError naming the setting if they can't."""
        budget = self.settings.max_resident_bytes

        used = self._resident_bytes
        if needed <= budget and used() + needed > budget:  # too big alone: evict nothing
            lru = sorted(
                (s for s in self.sessions.values() if s.resident and s is not keep),
                key=lambda s: s.last_used,
            )
            for session in lru:
                if used() + needed <= budget:
                    break
                if session.busy or session.users or session.watchers:
                    continue
                await self.flush(session)  # evictable once its changes are on disk
                if session.evict():
                    log.info("session_evicted", session_id=session.id, reason="max_resident_bytes")
        total = used() + needed
        if total > budget:
            raise LimitExceededError(
                limit_message(
                    "the memory of the sessions in memory, in bytes",
                    total,
                    budget,
                    "max_resident_bytes",
                )
                + " (or wait for busy sessions to finish)",
                setting="max_resident_bytes",
                limit=budget,
                value=total,
            )

    def _resident_bytes(self) -> int:
        """Bytes the resident sessions hold, plus those of sessions being created."""
        resident = sum(_session_bytes(s) for s in self.sessions.values() if s.resident)
        return resident + self._pending_bytes

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
            # Sessions whose checkpoint failed: try again, so they recover once there is room.
            for session_id in list(self.unsaved):
                failing = self.sessions.get(session_id)
                if failing is not None and failing.resident:
                    self.request_checkpoint(failing)
            self._evict_over_limit()
