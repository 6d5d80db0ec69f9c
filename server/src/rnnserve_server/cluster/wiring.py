"""Cluster mode assembled from settings: one :class:`ClusterNode` per replica.

The node owns the Redis coordinator, the lease table, the shared checkpoint store, the
forwarder and the router, and keeps the registry's view of sessions in step with the leases:

- a session is in this replica's registry only while this replica holds its lease (and was
  loaded under that lease's token, so a session that trained elsewhere meanwhile is reloaded);
- a lost lease (expired while paused, taken) drops the session here at once: its writes would
  be refused by the fenced pointer anyway;
- an idle session (evicted from memory by the registry, which checkpoints it first) gives its
  lease back, so any replica can activate it next;
- drain (SIGTERM): the registry checkpoints everything, then every lease is released;
- training jobs: Redis keeps the set of sessions with a detached job; every claim interval a
  replica with a free job slot activates (the path a call takes) those no one owns, and the
  activation resumes the job; a replica with more jobs than slots hands one off when another
  has a free slot; a checkpoint of a newer format is left to a newer replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc
import grpc.aio
from redis.exceptions import RedisError

from rnnserve_server import logs, metrics
from rnnserve_server.api.paging import page_token_after, read_page_request
from rnnserve_server.cluster.cluster_store import ClusterStore
from rnnserve_server.cluster.coordinator import Coordinator, DirectoryLostError
from rnnserve_server.cluster.forward import Forwarder, error_reason
from rnnserve_server.cluster.health import RedisHealth
from rnnserve_server.cluster.loss_stream import LossStreams
from rnnserve_server.cluster.metrics import ClusterCollector, ClusterCounts
from rnnserve_server.cluster.ownership import Ownership
from rnnserve_server.cluster.router import OwnerMovedError, Router, lock_for
from rnnserve_server.cluster.security import PeerTls, RedisAccess
from rnnserve_server.cluster.shared_store import SharedStore
from rnnserve_server.config import Settings
from rnnserve_server.errors import (
    CheckpointTooNewError,
    NewerFormatError,
    ShuttingDownError,
    StorageError,
)
from rnnserve_server.sessions.session_types import StopCause
from rnnserve_server.usecases.training import Jobs

log = logs.get_logger("rnnserve.cluster")


# Why a ListSessions entry has no state (no address: its owner is internal).
_UNREACHABLE = (
    "its owner replica can't be reached (it stopped, or advertises an address that can't be "
    "reached); calls for it fail until that replica answers again or its lease expires "
    "(within {ttl:g} s of its last renewal) and another replica takes it over"
)


def advertise_address(settings: Settings, port: int) -> str:
    """The address other replicas forward to: --advertise-address, else loopback:port."""
    return settings.advertise_address or f"127.0.0.1:{port}"


class ClusterNode:
    """This replica's part of the cluster."""

    def __init__(
        self,
        settings: Settings,
        *,
        peer_tls: PeerTls | None = None,
        redis_access: RedisAccess | None = None,
    ) -> None:
        assert settings.shared_dir is not None  # checked with the settings
        self.settings = settings
        self.peer_tls = peer_tls  # forwards over mutual TLS, accepted only from peers
        self.coordinator = Coordinator(
            settings.redis_url, lease_ttl=settings.lease_ttl, guarded=True, access=redis_access
        )
        # The address is known once the port is bound (bind()); claims wait for it.
        self.ownership = Ownership(
            self.coordinator, "", on_lost=self._on_lost, restore_directory=self.ensure_directory
        )
        self._rebuilding: asyncio.Task[None] | None = None
        self.shared = SharedStore(settings.shared_dir, self.coordinator, gc_grace=settings.gc_grace)
        # A forward whose owner froze gives up once the owner's lease is gone; one whose
        # owner can't be reached asks the caller to retry after a renewal period.
        self.forwarder = Forwarder(
            credentials=peer_tls.channel_credentials() if peer_tls is not None else None,
            options=peer_tls.channel_options() if peer_tls is not None else (),
            owner_gone=self.owner_gone,
            retry_seconds=settings.lease_ttl / 3,
        )
        self.registry: Any = None  # the Registry, set by attach()
        self.store: ClusterStore | None = None
        self.health: RedisHealth | None = None
        self.failovers = 0  # sessions activated here from a checkpoint behind their last step
        self.activations = 0
        self._active: dict[str, int] = {}  # session id -> token it was loaded under
        self._locks: dict[str, asyncio.Lock] = {}
        self._releaser: asyncio.Task[None] | None = None
        self._collector: asyncio.Task[None] | None = None
        self.gc_sweeps = 0  # sweeps of the shared directory this replica ran
        self.gc_removed = 0  # blobs (and temporary files) those sweeps removed
        self._releasing: set[asyncio.Task[None]] = set()
        self.streams = LossStreams(self.coordinator, lambda: self.registry)
        self._owners: dict[str, tuple[str, float]] = {}  # id -> (owner, cache expiry)
        self._owner_cache_ttl = min(1.0, settings.lease_ttl / 4)
        self.jobs: Jobs | None = None  # set by job_board()
        self._claimer: asyncio.Task[None] | None = None
        # Sessions whose checkpoint is newer than this replica reads -> that checkpoint's
        # name: left to a newer replica until the pointer moves.
        self._too_new: dict[str, str] = {}
        # Sessions activated here from a checkpoint behind the stream -> the step restored.
        self._restored_at: dict[str, int] = {}
        self.claim_interval = settings.job_claim_interval or settings.lease_ttl / 3
        self.jobs_claimed = 0  # training jobs taken over here
        self.jobs_handed_off = 0  # training jobs given to a replica with a free slot

    # -- assembly -------------------------------------------------------------------------

    def make_store(self) -> ClusterStore:
        """The registry's store (call on the running loop)."""
        self.store = ClusterStore(
            self.settings.data_dir, self.shared, self.ownership, asyncio.get_running_loop()
        )
        self.store.on_claimed = self._active.__setitem__
        self.store.on_stale = lambda session_id: self._spawn(self._drop_stale(session_id))
        return self.store

    def router(self) -> Router:
        """The routing interceptor (innermost: after auth and the request guard)."""
        return Router(
            self.route,
            self.done,
            self.forwarder,
            self.settings.max_message_bytes,
            self.list_sessions,
            self.watches_locally,
            self.streams.watch,
            peers_only=self.peer_tls is not None,
        )

    def job_board(self, jobs: Jobs) -> JobBoard:
        """The set of sessions with a detached job, for ``jobs`` (whose share of the cluster's
        jobs this node then balances)."""
        self.jobs = jobs
        return JobBoard(self.coordinator)

    def attach(self, registry: Any, port: int) -> None:
        """Start serving: the registry to keep in step, the bound port (for the address)."""
        self.registry = registry
        registry.taken_elsewhere = self.taken_elsewhere
        self.ownership.address = advertise_address(self.settings, port)
        self._releaser = asyncio.create_task(self._release_loop(), name="cluster-release")
        if self.settings.gc_interval > 0:
            self._collector = asyncio.create_task(self._gc_loop(), name="cluster-gc")
        if self.jobs is not None:
            self._claimer = asyncio.create_task(self._claim_loop(), name="cluster-jobs")
        metrics.REGISTRY.register(ClusterCollector(self.counts))
        log.info("cluster_joined", advertise=self.ownership.address)
        self._spawn(self._check_redis())

    async def _check_redis(self) -> None:
        """Warn once at start if Redis may lose its data on a restart."""
        try:
            kept = await self.coordinator.appendonly()
        except (RedisError, OSError) as exc:
            kept = f"Redis did not answer ({exc})"
        if kept is False:
            log.warning(
                "redis_appendonly_off",
                error="Redis runs with appendonly no: a restart loses every lease and loss "
                "stream, and the sessions' updates since their last checkpoint; the directory is "
                "then rebuilt from the shared directory. Set appendonly yes",
            )
        elif kept is not True:
            log.warning(
                "redis_appendonly_unknown",
                error="could not check that Redis keeps an append-only file (appendonly yes), "
                f"which the fencing tokens need to survive a restart: {kept}",
            )
        with contextlib.suppress(RedisError, OSError, StorageError):
            await self.ensure_directory()  # before the first call needs it

    # -- the directory after Redis lost its data ----------------------------------------------

    async def ensure_directory(self) -> None:
        """Return once Redis holds the cluster's directory: if Redis lost its data (restarted
        without its append-only file), one replica rebuilds it from the shared directory and
        the others wait. StorageError if it is not back within the lease TTL (retry)."""
        if await self.coordinator.directory_complete():
            return
        if self._rebuilding is None or self._rebuilding.done():
            self._rebuilding = asyncio.create_task(self._rebuild(), name="directory-rebuild")
        await asyncio.shield(self._rebuilding)

    async def _rebuild(self) -> None:
        deadline = time.monotonic() + max(5.0, self.settings.lease_ttl)
        while not await self.coordinator.directory_complete():
            if await self.coordinator.rebuild_turn(self.ownership.address, 60.0):
                started = time.monotonic()
                latest = await asyncio.to_thread(self.shared.latest_on_disk)
                await self.coordinator.restore(latest)
                (log.warning if latest else log.info)(
                    "directory_rebuilt",
                    sessions=len(latest),
                    duration_ms=round((time.monotonic() - started) * 1000, 1),
                    reason="Redis held no session directory (a restart without its append-only "
                    "file, or a new Redis): rebuilt from the shared directory",
                )
                return
            if time.monotonic() > deadline:  # another replica is rebuilding it: retry later
                raise DirectoryLostError()
            await asyncio.sleep(0.1)

    def counts(self) -> ClusterCounts:
        """This replica's cluster counters, for /metrics (read at scrape time)."""
        store, health = self.store, self.health
        return ClusterCounts(
            owned_sessions=len(self.ownership.owned()),
            forwards=self.forwarder.forwards,
            lease_renew_failures=self.ownership.renew_failures,
            leases_lost=self.ownership.leases_lost,
            activations=self.activations,
            failovers=self.failovers,
            stale_writes=store.stale_writes if store is not None else 0,
            gc_sweeps=self.gc_sweeps,
            gc_removed=self.gc_removed,
            redis_up=health is None or health.serving,
            jobs_claimed=self.jobs_claimed,
            jobs_handed_off=self.jobs_handed_off,
        )

    async def taken_elsewhere(self, session_id: str) -> bool:
        """True if the id is taken in the cluster (ForkSession / ImportSession onto a session
        this replica does not hold answer ALREADY_EXISTS, as in one process).

        False leaves the new id's lease with this replica, so no other replica can make it
        meanwhile: of two replicas making one new id at once, the one that takes the lease
        makes it and the other is told it exists. An id another replica holds but has not
        (or no longer) in the directory is being made or deleted there: wait (up to the lease
        TTL) for it to be registered, or let go."""
        deadline = time.monotonic() + self.settings.lease_ttl
        try:
            while not await self.coordinator.exists(session_id):
                async with lock_for(self._locks, session_id):
                    claim = await self.ownership.claim(session_id)
                    if not isinstance(claim, str):
                        if await self.coordinator.exists(session_id):
                            return True  # made and let go elsewhere meanwhile
                        self._active[session_id] = claim.token  # ours to make
                        return False
                if time.monotonic() > deadline:
                    return True
                await asyncio.sleep(0.05)
            return True
        except TimeoutError:
            raise StorageError(
                f"session id {session_id!r} is changing owner, so it cannot be checked yet; "
                "retry in a moment",
                session_id=session_id,
            ) from None
        except (RedisError, OSError):
            raise StorageError(
                "the cluster coordinator (Redis) is unreachable, so the new session's id "
                "cannot be checked; retry in a moment",
                session_id=session_id,
            ) from None

    # -- routing --------------------------------------------------------------------------

    async def route(self, session_id: str, forwarded: bool) -> str | None:
        """None: serve the call here (the session is active here, or does not exist yet and
        is ours to create); else the owner's address to forward to."""
        registry = self.registry
        registry.check_serving()
        if not forwarded:
            # A recently seen owner is forwarded to without asking Redis (two round trips);
            # if it gave the session up meanwhile, it routes the call itself.
            cached = self._owners.get(session_id)
            if cached is not None and cached[1] > time.monotonic():
                return cached[0]
        async with lock_for(self._locks, session_id):
            lease = self.ownership.lease(session_id)
            if lease is not None and self._active.get(session_id) == lease.token:
                return None
            claim = await self.ownership.claim(session_id)
            if isinstance(claim, str):
                if forwarded:
                    raise OwnerMovedError(
                        f"session {session_id!r} moved to another replica; retry the call"
                    )
                self._owners[session_id] = (claim, time.monotonic() + self._owner_cache_ttl)
                return claim
            self._owners.pop(session_id, None)
            if self._active.get(session_id) != claim.token:
                await self._activate(session_id, claim.token)
            return None

    async def owner_gone(self, session_id: str, address: str) -> None:
        """Return once ``address`` no longer holds the session's lease (it lapsed, was released
        or taken): a call forwarded there and still waiting is given up then, so a frozen
        owner costs about the lease TTL, whatever the caller's deadline."""
        while True:
            await asyncio.sleep(self.settings.lease_ttl / 3)  # the owner's renewal period
            try:
                owner = await self.coordinator.owner(session_id)
            except (RedisError, OSError):
                continue  # can't tell while Redis is away: keep waiting
            if owner != address:
                self._owners.pop(session_id, None)
                log.warning("forward_owner_lost", session_id=session_id, new_owner=owner)
                return

    async def _activate(self, session_id: str, token: int) -> None:
        registry = self.registry
        old = registry.sessions.pop(session_id, None)
        if old is not None:  # loaded under an older lease: another replica may have moved on
            old.deleted = True
        # Active under this token only once everything that needs Redis went through: a call
        # that fails midway (Redis stalled) leaves the activation to the next call.
        self._active.pop(session_id, None)
        pointer = await self.coordinator.pointer(session_id)
        if pointer is None:
            self._active[session_id] = token
            return  # not created yet (or deleted): the call answers for itself
        try:
            session = await registry.run_io(registry.factory.load, session_id, True)
        except CheckpointTooNewError as exc:  # a rolling upgrade: leave it to a newer replica
            self._too_new[session_id] = pointer
            with contextlib.suppress(RedisError, OSError):
                await self.ownership.release(session_id)
            log.warning("session_too_new", session_id=session_id, version=exc.version)
            raise NewerFormatError(
                f"session {session_id!r}: {exc.public}; no newer replica owns it now: retry "
                "once one runs (a rolling upgrade is under way)",
                session_id=session_id,
            ) from None
        self._too_new.pop(session_id, None)
        last = await self.coordinator.last_event(session_id)
        # Publishing resumes after the last step on the stream, or after the checkpoint if the
        # stream is ahead of it: steps the dead owner checkpointed but never published are in
        # the checkpoint's history, and go out now rather than leave a gap.
        published = session.step if last is None else min(last.step, session.step)
        rolled_back = last is not None and last.step > session.step
        if rolled_back:
            self._restored_at[session_id] = session.step
        else:
            self._restored_at.pop(session_id, None)
        if last is not None and rolled_back:
            # The old owner died after its last checkpoint: announce the rollback.
            await self.coordinator.publish_restored(session_id, session.step, token=token)
            self.failovers += 1
            log.warning(
                "session_restored",
                session_id=session_id,
                step=session.step,
                lost=last.step - session.step,
            )
        registry.sessions[session_id] = session
        session.deleted = False
        self._active[session_id] = token
        self.activations += 1
        self.streams.start(session_id, session, token, published)
        log.info("session_activated", session_id=session_id, step=session.step, token=token)
        if self.jobs is not None and not registry.shutting_down:  # its job goes on here
            await self.jobs.resume(session, session.step if rolled_back else None)

    def done(self, session_id: str) -> None:
        """A call served here ended: a session that no longer exists gives its lease back; a
        new one (just created) starts publishing its loss points."""
        if self.registry.shutting_down:
            return
        session = self.registry.sessions.get(session_id)
        if session is not None:
            lease = self.ownership.lease(session_id)
            if not self.streams.publishing(session_id) and lease is not None:
                self.streams.start(session_id, session, lease.token)
            return
        if session_id in self._active:
            self._spawn(self._release(session_id))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self, session_id: str) -> None:
        async with lock_for(self._locks, session_id):
            session = self.registry.sessions.get(session_id)
            if session is not None and (
                session.resident or session.use.users or session.use.watchers
            ):
                return  # in use again
            if session_id in self.registry.reserved:
                return  # being made here (ImportSession, ForkSession)
            await self._let_go(session_id)
            log.info("session_released", session_id=session_id)

    async def _on_lost(self, session_id: str) -> None:
        self._active.pop(session_id, None)
        self.streams.stop(session_id)
        registry = self.registry
        if registry is None:
            return
        session = registry.sessions.pop(session_id, None)
        log.warning("lease_lost", session_id=session_id)
        if session is not None:
            session.deleted = True  # no more checkpoints from here
            session.request_stop(StopCause.LEASE_LOST)  # its Train ends with LEASE_LOST
            session.close_watchers()
            registry.checkpoints.mark_saved(session)

    async def _drop_stale(self, session_id: str) -> None:
        """A checkpoint was refused: another replica owns the session now. Drop it here, and
        do not count the refusal as a storage failure (health stays SERVING)."""
        registry = self.registry
        if session_id in registry.sessions and self.ownership.lease(session_id) is None:
            await self._on_lost(session_id)
        for _ in range(100):  # the registry records the failure once the write returns
            if session_id in registry.checkpoints.unsaved:
                break
            await asyncio.sleep(0.02)
        registry.checkpoints.forget_failure(
            session_id, reason="stale write refused, not a storage failure"
        )

    async def _release_loop(self) -> None:
        """Give back leases of sessions the registry evicted (idle, or over the resident
        cap: checkpointed first) and of sessions idle past --idle-release-seconds."""
        period = min(1.0, self.settings.lease_ttl / 2)
        while True:
            await asyncio.sleep(period)
            idle = self.settings.idle_release_seconds
            cutoff = time.monotonic() - idle if idle > 0 else None
            for session_id in self.ownership.owned():
                session = self.registry.sessions.get(session_id)
                if session is None:
                    if session_id not in self._locks or not self._locks[session_id].locked():
                        self._spawn(self._release(session_id))
                    continue
                if session.busy or session.use.users or session.use.watchers:
                    continue
                if session.resident and cutoff is not None and session.use.last_used < cutoff:
                    await self.registry.checkpoints.flush(session)
                    if not session.unsaved_changes:
                        session.evict()
                if not session.resident:
                    self._spawn(self._release(session_id))

    # -- training jobs across replicas ------------------------------------------------------

    async def _claim_loop(self) -> None:
        """Every claim interval: say how many job slots are free here, hand off jobs waiting
        for a slot when another replica has one, claim jobs that lost their replica."""
        while True:
            await asyncio.sleep(self.claim_interval)
            if self.registry.shutting_down:
                return
            try:
                await self.balance_jobs()
            except (RedisError, OSError, StorageError) as exc:  # Redis away: next round
                log.warning("job_claim_failed", error=str(exc))
            except Exception as exc:  # never let the loop die: the jobs would stop moving
                log.error("job_claim_failed", error=f"{type(exc).__name__}: {exc}")

    async def balance_jobs(self) -> None:
        """One round of the claim loop."""
        jobs, coordinator, address = self.jobs, self.coordinator, self.ownership.address
        assert jobs is not None
        await coordinator.add_jobs(jobs.detached())  # back in the set after a Redis loss
        free = jobs.free_slots()
        await coordinator.put_free_slots(address, free)
        if free < 0:
            elsewhere = await coordinator.free_slots_elsewhere(address)
            for session_id in jobs.movable(min(-free, elsewhere)):
                self._spawn(self._hand_off(session_id))
            return
        for session_id, owner in await coordinator.job_owners():
            if free <= 0 or self.registry.shutting_down:
                return
            if owner is not None or session_id in self.registry.sessions:
                continue
            too_new = self._too_new.get(session_id)
            if too_new is not None and await coordinator.pointer(session_id) == too_new:
                continue  # still newer than this replica reads
            if await self._claim_job(session_id):
                free = jobs.free_slots()

    async def _claim_job(self, session_id: str) -> bool:
        """Activate a session whose job lost its replica, as a call would; True if its job
        runs here now. An entry whose session has no detached job left is dropped."""
        try:
            await self.route(session_id, True)  # True: never forward; raise if owned
        except (OwnerMovedError, NewerFormatError, ShuttingDownError, TimeoutError):
            return False
        session = self.registry.sessions.get(session_id)
        record = session.active_job if session is not None else None
        if record is None or record.attached:
            await self.coordinator.remove_job(session_id)
            self.done(session_id)
            return False
        self.jobs_claimed += 1
        log.info("job_claimed", session_id=session_id, job=record.job_id, step=session.step)
        return True

    async def _hand_off(self, session_id: str) -> None:
        """Give the session of a job waiting for a slot to a replica that has one: its job
        stops between two updates, is checkpointed (still RUNNING in its record) and the
        lease is released; a replica with a free slot claims it."""
        jobs = self.jobs
        assert jobs is not None
        async with lock_for(self._locks, session_id):
            session = self.registry.sessions.get(session_id)
            if session is None or not self.serves_locally(session_id):
                return
            await jobs.park(session_id)
            await self.registry.checkpoints.flush(session)
            if self.registry.shutting_down:
                return  # the drain checkpoints it and lets it go
            if session.unsaved_changes:  # not safely on disk: it goes on here
                await jobs.resume(session)
                return
            await self._let_go(session_id)
        self.jobs_handed_off += 1
        log.info("job_handed_off", session_id=session_id, step=session.step)

    async def _let_go(self, session_id: str) -> None:
        """Drop the session here and release its lease (under its activation lock)."""
        session = self.registry.sessions.pop(session_id, None)
        if session is not None:
            session.deleted = True  # no more checkpoints from here
            session.close_watchers()
        self._active.pop(session_id, None)
        self._owners.pop(session_id, None)
        self._restored_at.pop(session_id, None)
        self.streams.stop(session_id)
        if self.store is not None:
            await self.registry.run_io(self.store.forget, session_id)
        with contextlib.suppress(RedisError, OSError):
            await self.ownership.release(session_id)

    async def _gc_loop(self) -> None:
        """Every --gc-interval, one replica of the cluster (whichever takes the turn in Redis)
        sweeps the shared directory for blobs no session can point at any more: those the
        writers' own gc after each put never reaches (an idle session's, a crashed put's)."""
        period = self.settings.gc_interval
        while True:
            await asyncio.sleep(period)
            try:
                if not await self.coordinator.gc_turn(self.ownership.address, period):
                    continue
                started = time.monotonic()
                seen, removed = await self.shared.sweep()
            except (RedisError, OSError) as exc:
                log.warning("checkpoint_gc_failed", error=str(exc))
                continue
            self.gc_sweeps += 1
            self.gc_removed += removed
            log.info(
                "checkpoint_gc",
                sessions=seen,
                removed=removed,
                duration_ms=round((time.monotonic() - started) * 1000, 1),
            )

    # -- WatchLoss from the Redis stream ------------------------------------------------------

    def watches_locally(self, session_id: str, from_step: int) -> bool:
        """True if a WatchLoss from ``from_step`` is served from this replica's memory. A
        watcher asking for steps past a restore this replica made (a client reconnecting after
        the old owner died) saw steps that were lost: the stream, which holds them and the
        restore, tells it about the rollback."""
        restored = self._restored_at.get(session_id)
        rewinds = restored is not None and from_step > restored + 1
        return self.serves_locally(session_id) and not rewinds

    def serves_locally(self, session_id: str) -> bool:
        """True if the session is active here under our live lease."""
        lease = self.ownership.lease(session_id)
        return (
            lease is not None
            and self._active.get(session_id) == lease.token
            and session_id in self.registry.sessions
        )

    # -- listing --------------------------------------------------------------------------

    async def list_sessions(self, request: Any, context: Any) -> Any:
        """ListSessions over the whole cluster: ids from the Redis directory, each session's
        state from its owner (GetSession through this replica's own router)."""
        from rnnserve.v1 import rnn_service_pb2 as pb

        size, after = read_page_request(request.page_size, request.page_token)
        try:
            await self.ensure_directory()
            ids, next_after = await self.coordinator.list_sessions(size, after)
            total = await self.coordinator.count()
        except (RedisError, OSError):
            raise StorageError(
                "the cluster coordinator (Redis) is not answering, so the sessions can't be "
                "listed; retry in a moment"
            ) from None
        metadata = [
            (k, v)
            for k, v in context.invocation_metadata() or ()
            if not k.startswith(":")
            and k not in {"user-agent", "te", "content-type"}
            and k not in {"grpc-accept-encoding", "grpc-timeout", "x-session-id"}
        ]
        get = self.forwarder.channel(self.ownership.address).unary_unary(
            "/rnnserve.v1.RnnService/GetSession",
            request_serializer=pb.GetSessionRequest.SerializeToString,
            response_deserializer=pb.GetSessionResponse.FromString,
        )

        # Each entry waits at most 80 % of the caller's time: an owner that does not answer
        # (killed within its lease, a wrong advertised address, frozen) costs its own entry,
        # never the page.
        remaining = context.time_remaining()
        timeout = 30.0 if remaining is None else max(0.1, min(30.0, remaining * 0.8))

        async def one(session_id: str) -> Any:
            try:
                reply = await get(
                    pb.GetSessionRequest(session_id=session_id), metadata=metadata, timeout=timeout
                )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.NOT_FOUND:
                    return None  # deleted meanwhile
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    # A checkpoint newer than this replica reads: no replica that reads it
                    # answers, and the replica's own sentence says so.
                    newer = error_reason(exc) == "NEWER_FORMAT"
                    return pb.Session(
                        session_id=session_id,
                        state=pb.SESSION_STATE_OWNER_UNREACHABLE,
                        error=(exc.details() or "")
                        if newer
                        else _UNREACHABLE.format(ttl=self.settings.lease_ttl),
                    )
                return pb.Session(
                    session_id=session_id,
                    state=pb.SESSION_STATE_BROKEN,
                    error=f"its state could not be read: {exc.details()}",
                )
            return reply.session

        found = await asyncio.gather(*(one(i) for i in ids))
        sessions = [s for s in found if s is not None]
        token = page_token_after(next_after) if next_after else ""
        return pb.ListSessionsResponse(sessions=sessions, next_page_token=token, total_size=total)

    # -- lifecycle ------------------------------------------------------------------------

    def start_health(self, on_change: Any) -> RedisHealth:
        """Watch Redis: on_change(False) while it is unreachable, (True) once it is back."""

        def changed(ok: bool) -> None:
            on_change(ok)
            if ok and self.registry is not None:
                self.registry.residency.retry_unsaved()  # checkpoints refused while it was away

        self.health = RedisHealth(self.coordinator, changed).start()
        return self.health

    async def drain(self) -> None:
        """After the registry checkpointed every session: give every lease back."""
        with contextlib.suppress(RedisError, OSError):
            await self.coordinator.drop_free_slots(self.ownership.address)
        for task in (self._releaser, self._collector, self._claimer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.streams.flush_and_stop()  # the last points of stopped Trains
        await self.ownership.release_all()
        log.info("cluster_drained")

    async def close(self) -> None:
        """Stop watching Redis, close the channels and the Redis pool."""
        if self.health is not None:
            await self.health.stop()
        await self.forwarder.close()
        with contextlib.suppress(RedisError, OSError):
            await self.coordinator.close()


class JobBoard:
    """Training jobs' set in Redis (usecases/training.py's JobBoard)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self.coordinator = coordinator

    async def add(self, session_id: str) -> None:
        try:
            await self.coordinator.add_jobs([session_id])
        except (RedisError, OSError):
            raise StorageError(
                "the cluster coordinator (Redis) is not answering, so the job could not be "
                "recorded; retry in a moment",
                session_id=session_id,
            ) from None

    async def remove(self, session_id: str) -> None:
        await self.coordinator.remove_job(session_id)
