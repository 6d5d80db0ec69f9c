"""Which sessions stay in memory: the resident-bytes and resident-count budgets, least
recently used eviction, idle eviction."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

from rnnserve_server.config import Settings
from rnnserve_server.engine import budget
from rnnserve_server.engine.model_config import ModelConfig
from rnnserve_server.errors import LimitExceededError
from rnnserve_server.logs import get_logger
from rnnserve_server.sessions.checkpoint_writer import CheckpointWriter
from rnnserve_server.sessions.limits import limit_message
from rnnserve_server.sessions.session import Session

log = get_logger("rnnserve.registry")

_OPTIMIZER_SLOTS = {"sgd": 0, "adagrad": 1, "adam": 2}  # state arrays the size of the weights


def resident_bytes(config: ModelConfig, vocab_size: int, corpus_chars: int) -> int:
    """What a session's trainer holds in memory at most, for --max-resident-bytes: weights,
    optimizer state, gradient and proposed weights (update scratch), one window's workspace
    (inputs, hidden states and probabilities of every strand and step, forward and backward),
    the carried hidden states and the corpus ids."""
    V, B, T = vocab_size, config.batch_size, config.seq_length
    model = budget.Model.of(config, V)
    weights = model.parameters * model.itemsize * (3 + _OPTIMIZER_SLOTS.get(config.optimizer, 2))
    window = budget.workspace_bytes(model, T, B)
    state = B * model.spec.state_size * model.itemsize  # h (and c) of every layer per strand
    id_bytes = 1 if V <= 256 else 2 if V <= 65536 else 4
    return weights + window + state + corpus_chars * id_bytes


def session_bytes(session: Session) -> int:
    """``resident_bytes`` of a session, from what it reports while evicted too."""
    summary = session.summary
    if summary.config is None:
        return 0
    return resident_bytes(summary.config, len(summary.alphabet), summary.corpus_chars)


class Residency:
    """Which of a registry's sessions stay in memory. Evicting a session with unsaved changes
    waits for its checkpoint: ``checkpoints`` writes it (and tells the registry, which calls
    ``evict_over_limit`` again)."""

    def __init__(
        self, settings: Settings, sessions: dict[str, Session], checkpoints: CheckpointWriter
    ) -> None:
        self.settings = settings
        self.sessions = sessions  # the registry's: read here, never changed
        self.checkpoints = checkpoints
        self.pending_bytes = 0  # resident_bytes of the sessions being created

    @contextlib.contextmanager
    def reserving(self, nbytes: int) -> Iterator[None]:
        """Count ``nbytes`` as resident while the block runs (a session being created)."""
        self.pending_bytes += nbytes
        try:
            yield
        finally:
            self.pending_bytes -= nbytes

    async def make_room(self, needed: int, keep: Session | None = None) -> None:
        """Evict least recently used idle sessions until ``needed`` more bytes fit within
        max_resident_bytes; LimitExceededError naming the setting if they can't."""
        budget = self.settings.max_resident_bytes

        used = self.resident_bytes
        if needed <= budget and used() + needed > budget:  # too big alone: evict nothing
            lru = sorted(
                (s for s in self.sessions.values() if s.resident and s is not keep),
                key=lambda s: s.use.last_used,
            )
            for session in lru:
                if used() + needed <= budget:
                    break
                if session.busy or session.use.users or session.use.watchers:
                    continue
                await self.checkpoints.flush(session)  # evictable once its changes are on disk
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

    def resident_bytes(self) -> int:
        """Bytes the resident sessions hold, plus those of sessions being created."""
        resident = sum(session_bytes(s) for s in self.sessions.values() if s.resident)
        return resident + self.pending_bytes

    def resident_count(self) -> int:
        """How many sessions have their model in memory."""
        return sum(1 for s in self.sessions.values() if s.resident)

    def over_budget(self) -> bool:
        """True while the resident sessions are over either budget (count or bytes)."""
        return (
            self.resident_count() > self.settings.max_resident_sessions
            or self.resident_bytes() > self.settings.max_resident_bytes
        )

    def evict_over_limit(self, keep: Session | None = None) -> None:
        """Evict least recently used sessions beyond max_resident_sessions (never ``keep``).

        A session with unsaved changes is checkpointed first; the registry calls this again
        once the checkpoint is written.
        """
        if len(self.sessions) <= self.settings.max_resident_sessions:
            return  # nothing to evict; skips an O(sessions) count on every call
        excess = self.resident_count() - self.settings.max_resident_sessions
        if excess <= 0:
            return
        lru = sorted(
            (s for s in self.sessions.values() if s.resident and s is not keep),
            key=lambda s: s.use.last_used,
        )
        for session in lru:
            if excess <= 0:
                break
            if session.unsaved_changes:
                task = session.checkpoint.task
                if task is None or task.done():
                    self.checkpoints.request(session)  # evictable once written
                continue
            if session.evict():
                excess -= 1
                log.info("session_evicted", session_id=session.id, reason="max_resident_sessions")

    async def evict_loop(self) -> None:
        """Forever: evict sessions idle past --idle-evict-seconds, retry failed checkpoints
        (so they recover once there is room), keep within max_resident_sessions."""
        idle = self.settings.idle_evict_seconds
        period = min(max(idle / 4, 0.05), 30.0) if idle > 0 else 30.0
        while True:
            await asyncio.sleep(period)
            if idle > 0:
                cutoff = time.monotonic() - idle
                for session in list(self.sessions.values()):
                    if session.resident and session.use.last_used < cutoff:
                        if session.checkpoint.dirty:
                            self.checkpoints.request(session)
                        elif session.evict():
                            log.info("session_evicted", session_id=session.id, reason="idle")
            self.retry_unsaved()
            self.evict_over_limit()

    def retry_unsaved(self) -> None:
        """Checkpoint again the sessions whose checkpoint failed, so they recover once there
        is room (or, in cluster mode, once Redis answers again)."""
        for session_id in list(self.checkpoints.unsaved):
            failing = self.sessions.get(session_id)
            if failing is not None and failing.resident:
                self.checkpoints.request(failing)
