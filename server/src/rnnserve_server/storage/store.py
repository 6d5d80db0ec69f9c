"""Where sessions are kept: the ``Store`` protocol the registry writes through.

A store puts, gets, lists and deletes one session's state and corpus (a ``Checkpoint``,
checkpoint.py). ``LocalStore`` (local_store.py, the default) keeps them in a local data
directory; a store on shared storage for replicas (cluster mode) is one more class with these
methods. Methods do blocking I/O: the registry calls them from its I/O thread pool.
"""

from __future__ import annotations

from typing import Protocol

from rnnserve_server.storage.checkpoint import Checkpoint, MetaCheck


class Store(Protocol):
    """The persistence of sessions, as the registry uses it."""

    location: str  # where the sessions are, for the log (never sent to clients)

    def open(self) -> list[str]:
        """Take the store for this server (fails if another one holds it); the names of
        leftover temporary files removed."""

    def remove_orphans(self) -> list[str]:
        """Remove corpora without a state; their names."""

    def scan(self) -> tuple[list[str], list[str]]:
        """List: (the session ids kept, the names of entries that are not sessions)."""

    def save(self, ckpt: Checkpoint) -> int:
        """Put: write a session's state (and its corpus when ``ckpt`` carries it) atomically;
        sets ``ckpt.corpus``; the bytes written."""

    def load(self, session_id: str, check: MetaCheck | None = None) -> Checkpoint:
        """Get: read a session's state and corpus; CheckpointError if it can't be read."""

    def delete(self, session_id: str) -> bool:
        """Delete a session's state and corpus; False if there was none."""

    def mtime(self, session_id: str) -> float:
        """When the session's state was last written (unix seconds); OSError if unknown."""

    def has_corpus(self, session_id: str) -> bool:
        """Whether the session's corpus is still kept (a deleted directory loses it)."""

    def ensure_dirs(self) -> bool:
        """Recreate the store's directories if they went; True if they had to be."""

    def close(self) -> None:
        """Release the store."""
