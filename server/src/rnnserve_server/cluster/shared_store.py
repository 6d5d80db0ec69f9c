"""Checkpoints on a directory every replica mounts, with fenced pointer moves.

A checkpoint is an opaque bytes blob (the session's serialized state is produced elsewhere)
written once under an immutable name ``<root>/<id>/<token>-<step>.npz``: temporary file, fsync,
rename, fsync of the directory. Which blob is the session's latest is not a file: it is the
pointer in Redis, moved only by the coordinator's fenced script. So a paused or partitioned old
owner may still write a blob, but it can never make it the latest, and it never overwrites
anything (names carry the token). ``gc`` removes blobs the pointer has moved past (the writer
runs it after each put); ``sweep`` runs it over every session on the directory, for blobs no
later put will clean up (an idle session's, a crashed writer's), and is scheduled by the
replica (``--gc-interval``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from rnnserve_server.cluster.coordinator import Coordinator, PointerMove

SUFFIX = ".npz"
_NAME = re.compile(r"^(\d+)-(\d+)\.npz$")
_TMP_PREFIX = ".tmp-"


class StaleTokenError(Exception):
    """A write with a fencing token that is no longer the session's newest: another replica
    owns the session now, so this one must stop acting as its owner."""


class CheckpointMissingError(Exception):
    """The pointer names a checkpoint that is not on the shared directory (lost storage)."""


@dataclass(frozen=True)
class CheckpointBlob:
    """One stored checkpoint blob: its immutable name and content (the serialized session
    state, a storage.checkpoint.Checkpoint packed by the cluster store)."""

    name: str  # "<token>-<step>.npz"
    token: int
    step: int
    data: bytes


def checkpoint_name(token: int, step: int) -> str:
    """The immutable file name of the checkpoint written with ``token`` at ``step``."""
    if token < 1 or step < 0:
        raise ValueError(f"token must be >= 1 and step >= 0 (got {token}, {step})")
    return f"{token}-{step}{SUFFIX}"


def parse_name(name: str) -> tuple[int, int] | None:
    """``(token, step)`` of a checkpoint file name, or None if it is not one."""
    match = _NAME.match(name)
    return (int(match[1]), int(match[2])) if match else None


def _check_id(session_id: str) -> None:
    # The id becomes one directory name: nothing that could climb out of the root.
    if (
        not session_id
        or session_id in {".", ".."}
        or "/" in session_id
        or "\\" in session_id
        or "\0" in session_id
    ):
        raise ValueError(f"session id {session_id!r} cannot be a directory name")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SharedStore:
    """Fenced checkpoint storage for cluster mode: blobs on ``root``, pointer in Redis."""

    def __init__(self, root: Path, coordinator: Coordinator, *, gc_grace: float = 300.0) -> None:
        self.root = Path(root)
        self.coordinator = coordinator
        # Blobs newer than the pointer may be a put between its rename and its pointer move;
        # gc leaves them alone until they are this many seconds old.
        self.gc_grace = gc_grace

    def session_dir(self, session_id: str) -> Path:
        """The directory holding the session's blobs."""
        _check_id(session_id)
        return self.root / session_id

    async def put(self, session_id: str, token: int, step: int, data: bytes) -> str:
        """Write ``data`` as the checkpoint at ``step`` and make it the session's latest.

        Returns the checkpoint's name. Raises :class:`StaleTokenError` (and removes the blob
        it wrote, unless a rebuild of the directory may adopt it) if ``token`` is no longer the
        session's current fencing token.
        """
        name = checkpoint_name(token, step)
        directory = self.session_dir(session_id)
        await asyncio.to_thread(self._write, directory, name, data)
        moved = await self.coordinator.advance_pointer(session_id, token, name)
        if moved != PointerMove.MOVED:
            if moved == PointerMove.STALE:
                with contextlib.suppress(FileNotFoundError):
                    await asyncio.to_thread((directory / name).unlink)
            raise StaleTokenError(
                f"session {session_id!r}: token {token} is stale; another replica owns it now"
            )
        return name

    @staticmethod
    def _write(directory: Path, name: str, data: bytes) -> None:
        created = not directory.exists()
        directory.mkdir(parents=True, exist_ok=True)
        if created:
            _fsync_dir(directory.parent)
        tmp = directory / f"{_TMP_PREFIX}{name}.{os.getpid()}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, directory / name)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        _fsync_dir(directory)

    async def latest(self, session_id: str) -> CheckpointBlob | None:
        """The checkpoint the session's pointer names, or None if it has none yet.

        Raises :class:`CheckpointMissingError` if the pointer names a blob that is gone.
        """
        directory = self.session_dir(session_id)
        name = await self.coordinator.pointer(session_id)
        if name is None:
            return None
        parsed = parse_name(name)
        if parsed is None:
            raise CheckpointMissingError(f"session {session_id!r}: bad checkpoint name {name!r}")
        try:
            data = await asyncio.to_thread((directory / name).read_bytes)
        except FileNotFoundError:
            raise CheckpointMissingError(
                f"session {session_id!r}: its latest checkpoint {name} is missing from the "
                "shared directory"
            ) from None
        return CheckpointBlob(name, parsed[0], parsed[1], data)

    async def gc(self, session_id: str, *, min_age: float = 0.0) -> list[str]:
        """Remove the session's blobs no one can point at any more; the names removed.

        Kept: the blob the pointer names; blobs older than it (by token, then step) younger
        than ``min_age`` seconds (0 for the writer itself, which just moved the pointer past
        them; ``gc_grace`` for a sweep, which runs beside the writers); blobs newer than it
        that carry the session's current fencing token (its owner may yet point at them: a
        put between its rename and its pointer move) or are younger than ``gc_grace``.
        Temporary files go once older than ``gc_grace``. With no pointer (a session being
        created, or one Redis lost), nothing is removed.
        """
        directory = self.session_dir(session_id)
        name, token = await self.coordinator.pointer_and_token(session_id)
        current = parse_name(name) if name is not None else None
        if current is None:
            return []
        return await asyncio.to_thread(self._gc, directory, current, token, min_age, time.time())

    def _gc(
        self, directory: Path, current: tuple[int, int], token: int, min_age: float, now: float
    ) -> list[str]:
        removed: list[str] = []
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            return removed
        for entry in entries:
            parsed = parse_name(entry.name)
            try:
                age = now - entry.stat().st_ctime  # ctime: a rename updates it
            except FileNotFoundError:
                continue
            if parsed is None:
                garbage = entry.name.startswith(_TMP_PREFIX) and age > self.gc_grace
            elif parsed < current:
                garbage = age >= min_age
            elif parsed > current:
                # Only a writer holding the current token can still move the pointer here.
                garbage = parsed[0] < token and age > self.gc_grace
            else:
                garbage = False  # the latest checkpoint
            if not garbage:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(entry.name)
        if removed:
            _fsync_dir(directory)
        return sorted(removed)

    async def sweep(self) -> tuple[int, int]:
        """``gc`` every session directory on the shared root, leaving alone blobs younger
        than ``gc_grace``; ``(sessions looked at, blobs removed)``. A session whose directory
        can't be read is skipped; RedisError ends the sweep (the next one starts over)."""
        seen = removed = 0
        for session_id in await asyncio.to_thread(self.session_ids):
            try:
                removed += len(await self.gc(session_id, min_age=self.gc_grace))
            except (OSError, ValueError):
                continue
            seen += 1
        return seen, removed

    def session_ids(self) -> list[str]:
        """The ids of the session directories on the shared root, sorted (blocking)."""
        try:
            with os.scandir(self.root) as entries:
                return sorted(
                    e.name
                    for e in entries
                    if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
                )
        except FileNotFoundError:
            return []

    def latest_on_disk(self) -> dict[str, str]:
        """Each session directory's newest checkpoint name (largest token, then step): what
        the pointers were, for a rebuild after Redis lost them. Blocking: run it in a thread."""
        latest: dict[str, str] = {}
        for session_id in self.session_ids():
            try:
                with os.scandir(self.root / session_id) as entries:
                    names = [(parse_name(e.name), e.name) for e in entries]
            except OSError:
                continue  # gone meanwhile, or unreadable: nothing to restore
            found = [(parsed, name) for parsed, name in names if parsed is not None]
            if found:
                latest[session_id] = max(found)[1]
        return latest

    async def delete(self, session_id: str) -> None:
        """Remove every blob of the session (after it was removed from the directory)."""
        directory = self.session_dir(session_id)

        def remove() -> None:
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(directory):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                directory.rmdir()

        await asyncio.to_thread(remove)
