"""Activating a session on this replica: take its lease, load its latest checkpoint, and
announce a rollback on its loss stream when the checkpoint is behind what watchers saw.

After a graceful hand-over (drain: checkpoint, then release) the checkpoint is at the last
published step and nothing is announced. After an owner died, the steps it trained after its
last checkpoint are lost: the stream gets a ``restored`` event at the checkpoint's step, so a
watcher sees the rollback instead of a silent jump back.
"""

from __future__ import annotations

from dataclasses import dataclass

from rnnserve_server.cluster.coordinator import Lease
from rnnserve_server.cluster.ownership import Ownership
from rnnserve_server.cluster.shared_store import Checkpoint, SharedStore


@dataclass(frozen=True)
class Activation:
    """A session now owned here: build it from ``checkpoint`` (None: never checkpointed)."""

    lease: Lease
    checkpoint: Checkpoint | None
    rolled_back_from: int | None  # the last step watchers saw, if it was past the checkpoint

    @property
    def step(self) -> int:
        """The step the session resumes at."""
        return self.checkpoint.step if self.checkpoint is not None else 0


async def activate(ownership: Ownership, store: SharedStore, session_id: str) -> Activation | str:
    """Own and load ``session_id``; or the owner's address if another replica holds it
    (forward the call there; if that replica is dead, its lease expires within the TTL and a
    later call activates the session here)."""
    claim = await ownership.claim(session_id)
    if isinstance(claim, str):
        return claim
    checkpoint = await store.latest(session_id)
    step = checkpoint.step if checkpoint is not None else 0
    coordinator = ownership.coordinator
    last = await coordinator.last_event(session_id)
    last_seen = last.step if last is not None else None
    rolled_back_from = None
    if last_seen is not None and last_seen > step:
        await coordinator.publish_restored(session_id, step, token=claim.token)
        rolled_back_from = last_seen
    return Activation(claim, checkpoint, rolled_back_from)
