"""Redis coordinator for cluster mode: who owns a session, and what a replica may write.

Keys (``P`` is the prefix; ``{id}`` is a Redis Cluster hash tag so one session's keys share a
slot and its scripts stay single-slot):

- ``P:s:{id}:lease``   ``"<replica address>|<token>"`` with a TTL: the owner (``SET NX PX``).
- ``P:s:{id}:token``   the fencing token counter (``INCR`` on every acquisition; never reset).
- ``P:s:{id}:ckpt``    the name of the session's latest checkpoint; moved only by a script that
  checks the writer's token is the current one, so a paused or partitioned old owner cannot
  move it.
- ``P:s:{id}:loss``    a Stream of loss points (``step``, ``loss``, ``token``, and ``val``, the
  validation loss, at the steps where one was measured) and ``restored`` events
  (``XADD MAXLEN ~``).
- ``P:sessions``       the directory: a sorted set of ids, all score 0, paged by id (``BYLEX``).
- ``P:gc``             which replica sweeps the shared directory this period (``SET NX PX``).
- ``P:directory``      the marker: set once the directory is complete. Its absence means Redis
  lost its data (restarted without its append-only file): until a replica has rebuilt the
  directory, the pointers and the token counters from the shared directory
  (:meth:`Coordinator.restore`), a guarded coordinator refuses to hand out leases, so no token
  is handed out twice and no id is created over a session it lost.
- ``P:rebuild``        which replica rebuilds the directory (``SET NX PX``).

Run Redis with ``appendonly yes``: without it a restart loses the leases and the loss streams,
and whatever the owners had not checkpointed.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.typing import EncodableT, FieldT

from rnnserve_server.cluster.security import RedisAccess
from rnnserve_server.errors import StorageError

# Take the lease only when it is free; the token is bumped in the same atomic step, so a lease
# never exists without its token. With the marker's key (KEYS[3]; guarded), none is handed out
# while the marker is missing (Redis lost its data: the counters would start over).
_ACQUIRE = """
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 0 then return -1 end
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'NX', 'PX', ARGV[2])
return token
"""

# Extend / drop the lease only while it is still ours (same replica AND same token).
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The fenced write: the pointer moves only for the holder of the newest token, and only
# forward: a write whose caller gave up on a stalled Redis may reach it after a later one of
# the same owner, and must not take the pointer back to a blob gc may have removed. A refused
# write's blob is kept (2) when a rebuild of the directory may adopt it or already has: the
# counter is gone (Redis lost its data), or the pointer names it.
_ADVANCE = """
local counted = redis.call('GET', KEYS[1])
local current = tonumber(counted or '0')
local latest = redis.call('GET', KEYS[2])
if tonumber(ARGV[1]) ~= current then
  if not counted or latest == ARGV[2] then return 2 end
  return 0
end
if latest then
  local token, step = string.match(latest, '^(%d+)-(%d+)')
  local new_step = string.match(ARGV[2], '^%d+-(%d+)')
  if token and new_step and tonumber(token) == current
      and tonumber(step) > tonumber(new_step) then
    return 1
  end
end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""

# A session's counter and pointer from the shared directory, after Redis lost them: the
# counter is raised to ARGV[2] (above every token on disk) only if it is behind the disk (a
# live one is left alone); the pointer is set only if it has none.
_RESTORE = """
local counted = tonumber(redis.call('GET', KEYS[1]) or '0')
if counted < tonumber(ARGV[2]) - 1 then redis.call('SET', KEYS[1], ARGV[2]) end
redis.call('SET', KEYS[2], ARGV[1], 'NX')
return 1
"""

# An owner's loss points, each appended once however often the call is sent: a publish
# whose caller gave up on a stalled Redis (socket timeout) may still be executed, and the
# owner then sends the same points again. Points at or before the newest entry of the same
# fencing token are skipped (an owner publishes its steps in order). ARGV: token ('' for
# none: nothing skipped), MAXLEN, first step, then each point's loss and validation loss
# ('' if none was measured). Returns the number appended.
_PUBLISH = """
local first = tonumber(ARGV[3])
local skip = 0
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
if ARGV[1] ~= '' and newest then
  local token, step
  local fields = newest[2]
  for i = 1, #fields, 2 do
    if fields[i] == 'token' then token = fields[i + 1] end
    if fields[i] == 'step' then step = tonumber(fields[i + 1]) end
  end
  if token == ARGV[1] and step and step >= first then skip = step - first + 1 end
end
local count = (#ARGV - 3) / 2
for i = skip, count - 1 do
  local point = {'kind', 'loss', 'step', string.format('%d', first + i), 'loss', ARGV[4 + 2 * i]}
  if ARGV[1] ~= '' then
    point[#point + 1] = 'token'
    point[#point + 1] = ARGV[1]
  end
  if ARGV[5 + 2 * i] ~= '' then
    point[#point + 1] = 'val'
    point[#point + 1] = ARGV[5 + 2 * i]
  end
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', unpack(point))
end
return math.max(count - skip, 0)
"""

EventKind = Literal["loss", "restored"]


class PointerMove(enum.IntEnum):
    """What :meth:`Coordinator.advance_pointer` did."""

    STALE = 0  # refused: another replica owns the session (the blob is garbage)
    MOVED = 1  # the pointer names the blob now (or a later one of the same owner already)
    STALE_KEPT = 2  # refused, but keep the blob: a rebuild of the directory may adopt it


class DirectoryLostError(StorageError):
    """Redis lost its data (restarted without its append-only file) and the session directory
    is not rebuilt from the shared directory yet: no lease can be handed out meanwhile."""

    def __init__(self) -> None:
        super().__init__(
            "the cluster coordinator (Redis) restarted without its data; the session "
            "directory is being rebuilt from the shared directory, retry in a moment"
        )


@dataclass(frozen=True)
class Lease:
    """Ownership of one session by one replica, fenced by ``token``."""

    session_id: str
    owner: str  # the replica's advertised address
    token: int
    ttl: float  # seconds
    # Local monotonic clock just before the acquiring call was sent: the lease is certainly
    # ours until acquired_at + ttl (Redis started its TTL later than this).
    acquired_at: float = 0.0

    @property
    def value(self) -> str:
        """What the lease key holds while this lease is live."""
        return f"{self.owner}|{self.token}"


@dataclass(frozen=True)
class StreamEvent:
    """One entry of a session's loss stream.

    ``kind == "loss"``: a training loss point at ``step``. ``kind == "restored"``: the session
    was activated from a checkpoint at ``step`` (after a failover), so points that follow may
    repeat steps already seen: a rollback, announced.
    """

    id: str  # the Redis stream id: pass it back as ``from_id`` to resume after this entry
    kind: EventKind
    step: int
    loss: float | None = None
    token: int | None = None
    validation: float | None = None  # the validation loss measured at ``step``, if one was


class Coordinator:
    """Leases, fencing tokens, the session directory and loss streams in one Redis.

    Every method is a coroutine that raises ``redis.exceptions.RedisError`` (a
    ``ConnectionError`` while Redis is unreachable); the client reconnects by itself, so the
    next call after Redis is back succeeds.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "rnnserve",
        lease_ttl: float = 3.0,
        stream_maxlen: int = 10_000,
        op_timeout: float | None = None,
        guarded: bool = False,
        access: RedisAccess | None = None,
    ) -> None:
        if lease_ttl <= 0:
            raise ValueError("lease_ttl must be > 0 seconds")
        if stream_maxlen < 1:
            raise ValueError("stream_maxlen must be >= 1")
        self.prefix = prefix
        self.lease_ttl = lease_ttl
        # Guarded: no lease while the directory marker is missing (DirectoryLostError).
        self.guarded = guarded
        self.stream_maxlen = stream_maxlen
        # How long one call may wait for Redis: by default a renewal interval (a third of the
        # TTL, 0.5-5 s). A Redis that answers slower can't keep leases anyway, and a frozen
        # one must fail the call (a checkpoint, so Steps are refused) rather than stall it.
        if op_timeout is None:
            op_timeout = min(5.0, max(0.5, lease_ttl / 3))
        self.op_timeout = op_timeout
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=op_timeout,
            socket_timeout=op_timeout,
            # A command that meets a dropped connection (Redis restarted) is retried on a
            # new one a few times before the error reaches the caller; one that timed out is
            # not (a frozen Redis would not answer the retry either).
            retry=Retry(
                ExponentialBackoff(cap=0.5, base=0.02),
                retries=3,
                supported_errors=(RedisConnectionError,),
            ),
            retry_on_error=[RedisConnectionError],
            health_check_interval=10,
            # The password and TLS files (--redis-password-file, --redis-tls-*).
            **(access or RedisAccess()).client_options(url),
        )
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self._advance = self.redis.register_script(_ADVANCE)
        self._restore = self.redis.register_script(_RESTORE)
        self._publish = self.redis.register_script(_PUBLISH)

    # -- keys ---------------------------------------------------------------------------------

    def key(self, session_id: str, what: str) -> str:
        return f"{self.prefix}:s:{{{session_id}}}:{what}"

    @property
    def _directory(self) -> str:
        return f"{self.prefix}:sessions"

    @property
    def _marker(self) -> str:
        return f"{self.prefix}:directory"

    @property
    def _jobs(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def _capacity(self) -> str:
        return f"{self.prefix}:capacity"

    # -- connection ---------------------------------------------------------------------------

    async def ping(self) -> bool:
        """True if Redis answers within ``op_timeout`` (for health: NOT_SERVING otherwise)."""
        try:
            async with asyncio.timeout(self.op_timeout):
                return bool(await self.redis.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        """Close the connection pool."""
        await self.redis.aclose()

    async def appendonly(self) -> bool | str:
        """Whether Redis keeps an append-only file (``CONFIG GET appendonly``), or why that
        could not be checked (a managed Redis may forbid CONFIG)."""
        try:
            reply: Any = await self.redis.config_get("appendonly")
        except ResponseError as exc:
            return str(exc)
        value = reply.get("appendonly") if isinstance(reply, dict) else None
        return value == "yes" if value is not None else "CONFIG GET answered nothing"

    # -- the directory after Redis lost its data ----------------------------------------------

    async def directory_complete(self) -> bool:
        """True while the directory marker is set (Redis kept its data, or was rebuilt)."""
        return bool(await self.redis.exists(self._marker))

    async def rebuild_turn(self, replica_addr: str, period: float) -> bool:
        """True for the one replica that rebuilds the directory for the next ``period``
        seconds (``SET NX PX``)."""
        done = await self.redis.set(
            f"{self.prefix}:rebuild", replica_addr, nx=True, px=max(1, round(period * 1000))
        )
        return bool(done)

    async def restore(self, latest: Mapping[str, str], batch: int = 1000) -> None:
        """Put back what the shared directory knows, then set the marker: for each session id
        its latest checkpoint's name (``<token>-<step>.npz``), which becomes its pointer if it
        has none, with its token counter raised above that token if it is behind it, and its
        id in the directory."""
        items = list(latest.items())
        for start in range(0, len(items), batch):
            async with self.redis.pipeline(transaction=False) as pipe:
                for session_id, name in items[start : start + batch]:
                    token = int(name.split("-", 1)[0])
                    await self._restore(
                        keys=[self.key(session_id, "token"), self.key(session_id, "ckpt")],
                        args=[name, token + 1],
                        client=pipe,
                    )
                    pipe.zadd(self._directory, {session_id: 0}, nx=True)
                await pipe.execute()
        await self.redis.set(self._marker, str(time.time()))

    # -- leases -------------------------------------------------------------------------------

    async def acquire(self, session_id: str, replica_addr: str) -> Lease | None:
        """Take the session's lease for ``replica_addr`` with a new, larger fencing token;
        None if another lease is live. Guarded: DirectoryLostError while the directory
        marker is missing."""
        ttl_ms = max(1, round(self.lease_ttl * 1000))
        sent = time.monotonic()
        keys = [self.key(session_id, "lease"), self.key(session_id, "token")]
        token = await self._acquire(
            keys=[*keys, self._marker] if self.guarded else keys,
            args=[replica_addr, ttl_ms],
        )
        if token is None:
            return None
        if int(token) < 0:
            raise DirectoryLostError()
        return Lease(session_id, replica_addr, int(token), self.lease_ttl, sent)

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease by its TTL; False if it is no longer ours (expired, or taken)."""
        (still_ours,) = await self.renew_many([lease])
        return still_ours

    async def renew_many(self, leases: list[Lease]) -> list[bool]:
        """``renew`` each lease, all in one round trip (a pipeline of the renew script)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for lease in leases:
                ttl_ms = max(1, round(lease.ttl * 1000))
                await self._renew(
                    keys=[self.key(lease.session_id, "lease")],
                    args=[lease.value, ttl_ms],
                    client=pipe,
                )
            return [bool(done) for done in await pipe.execute()]

    async def release(self, lease: Lease) -> bool:
        """Drop the lease if it is still ours; False if it already expired or was taken."""
        done = await self._release(keys=[self.key(lease.session_id, "lease")], args=[lease.value])
        return bool(done)

    async def owner(self, session_id: str) -> str | None:
        """The address of the replica holding the session's live lease, or None."""
        value = await self.redis.get(self.key(session_id, "lease"))
        if value is None:
            return None
        return str(value).rsplit("|", 1)[0]

    async def current_token(self, session_id: str) -> int:
        """The newest fencing token handed out for the session (0 if never owned)."""
        value = await self.redis.get(self.key(session_id, "token"))
        return int(value) if value is not None else 0

    # -- the fenced checkpoint pointer ----------------------------------------------------------

    async def advance_pointer(
        self, session_id: str, token: int, checkpoint_name: str
    ) -> PointerMove:
        """Point the session at ``checkpoint_name`` if ``token`` is its current fencing token
        (MOVED); STALE (nothing changed) for a stale token, STALE_KEPT if the blob must be
        kept all the same (see :class:`PointerMove`). A name of an earlier step than the
        pointer's of the same token leaves the pointer where it is (MOVED: that write is
        superseded)."""
        done = await self._advance(
            keys=[self.key(session_id, "token"), self.key(session_id, "ckpt")],
            args=[token, checkpoint_name],
        )
        return PointerMove(int(done))

    async def pointer(self, session_id: str) -> str | None:
        """The name of the session's latest checkpoint, or None if it has none."""
        value = await self.redis.get(self.key(session_id, "ckpt"))
        return None if value is None else str(value)

    async def pointer_and_token(self, session_id: str) -> tuple[str | None, int]:
        """The pointer and the newest fencing token, read together (one MGET: the keys
        share a slot)."""
        name, token = await self.redis.mget(
            self.key(session_id, "ckpt"), self.key(session_id, "token")
        )
        return (None if name is None else str(name)), (int(token) if token is not None else 0)

    async def gc_turn(self, replica_addr: str, period: float) -> bool:
        """True for the one replica that takes the cluster's garbage-collection turn for the
        next ``period`` seconds (``SET NX PX``, never released: the turn simply expires)."""
        done = await self.redis.set(
            f"{self.prefix}:gc", replica_addr, nx=True, px=max(1, round(period * 1000))
        )
        return bool(done)

    # -- directory ------------------------------------------------------------------------------

    async def register(self, session_id: str) -> bool:
        """Add the session to the directory; False if it was there already."""
        return bool(await self.redis.zadd(self._directory, {session_id: 0}, nx=True))

    async def unregister(self, session_id: str) -> None:
        """Remove the session from the directory with its checkpoint pointer and stream.

        The lease is left to its holder (release) and the token counter stays, so a re-created
        id never reuses a token."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self._directory, session_id)
            pipe.zrem(self._jobs, session_id)
            pipe.delete(
                self.key(session_id, "ckpt"),
                self.key(session_id, "loss"),
            )
            await pipe.execute()

    async def exists(self, session_id: str) -> bool:
        """True if the session is in the directory."""
        return await self.redis.zscore(self._directory, session_id) is not None

    async def count(self) -> int:
        """How many sessions the directory holds."""
        return int(await self.redis.zcard(self._directory))

    async def list_sessions(self, page_size: int, after: str = "") -> tuple[list[str], str]:
        """One page of session ids in id order, starting after ``after`` (""= from the start).

        Returns ``(ids, next_after)``; ``next_after`` is "" on the last page.
        """
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        low = f"({after}" if after else "-"
        ids = await self.redis.zrangebylex(self._directory, low, "+", start=0, num=page_size + 1)
        page = [str(i) for i in ids[:page_size]]
        return page, (page[-1] if len(ids) > page_size else "")

    # -- training jobs --------------------------------------------------------------------------

    async def add_jobs(self, session_ids: list[str]) -> None:
        """Put sessions in the set of sessions with a queued or running job (a session already
        there keeps its place: the oldest job is claimed first)."""
        if session_ids:
            now = time.time()
            await self.redis.zadd(self._jobs, {i: now for i in session_ids}, nx=True)

    async def remove_job(self, session_id: str) -> None:
        """Take the session out of the set (its job ended)."""
        await self.redis.zrem(self._jobs, session_id)

    async def job_owners(self) -> list[tuple[str, str | None]]:
        """(session id, owner's address or None) for every session with a job, oldest first."""
        ids = [str(i) for i in await self.redis.zrange(self._jobs, 0, -1)]
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for session_id in ids:
                pipe.get(self.key(session_id, "lease"))
            values = await pipe.execute()
        return [
            (i, None if v is None else str(v).rsplit("|", 1)[0])
            for i, v in zip(ids, values, strict=True)
        ]

    async def put_free_slots(self, replica_addr: str, free: int) -> None:
        """Say how many job slots this replica has free (negative: jobs waiting for one),
        valid for a lease TTL."""
        expiry = time.time() + self.lease_ttl
        await self.redis.hset(self._capacity, replica_addr, f"{free}|{expiry:.3f}")

    async def drop_free_slots(self, replica_addr: str) -> None:
        """This replica takes no more jobs (drain)."""
        await self.redis.hdel(self._capacity, replica_addr)

    async def free_slots_elsewhere(self, replica_addr: str) -> int:
        """The free job slots the other replicas said they have (expired entries removed)."""
        entries: dict[Any, Any] = await self.redis.hgetall(self._capacity)
        now, free, expired = time.time(), 0, []
        for address, value in entries.items():
            count, _, expiry = str(value).partition("|")
            try:
                if float(expiry) < now:
                    expired.append(address)
                elif address != replica_addr:
                    free += max(0, int(count))
            except ValueError:
                expired.append(address)
        if expired:
            await self.redis.hdel(self._capacity, *expired)
        return free

    # -- loss streams ---------------------------------------------------------------------------

    async def publish_loss(
        self,
        session_id: str,
        step: int,
        loss: float,
        token: int | None = None,
        validation: float | None = None,
    ) -> str:
        """Append a loss point (with its validation loss, if one was measured at ``step``) to
        the session's stream; its stream id."""
        return await self._xadd(session_id, _loss_fields(step, loss, token, validation))

    async def publish_restored(self, session_id: str, step: int, token: int | None = None) -> str:
        """Announce on the stream that the session was restored at ``step`` (a failover)."""
        fields: dict[FieldT, EncodableT] = {"kind": "restored", "step": step}
        if token is not None:
            fields["token"] = token
        return await self._xadd(session_id, fields)

    async def publish_losses(
        self,
        session_id: str,
        first_step: int,
        losses: list[float],
        token: int | None = None,
        validation: Mapping[int, float] | None = None,
    ) -> int:
        """Append the loss points of steps ``first_step``, ``first_step + 1``, ... in one
        round trip; ``validation`` maps a step to the validation loss measured there (a point
        of such a step carries it). With a ``token``, sending the same points again (after a
        call that timed out but went through) appends none twice. The number appended."""
        args: list[EncodableT] = [
            "" if token is None else token,
            self.stream_maxlen,
            first_step,
        ]
        for offset, loss in enumerate(losses):
            measured = validation.get(first_step + offset) if validation is not None else None
            args += [repr(float(loss)), "" if measured is None else repr(float(measured))]
        return int(await self._publish(keys=[self.key(session_id, "loss")], args=args))

    async def _xadd(self, session_id: str, fields: dict[FieldT, EncodableT]) -> str:
        entry_id = await self.redis.xadd(
            self.key(session_id, "loss"),
            fields,
            maxlen=self.stream_maxlen,
            approximate=True,  # MAXLEN ~ trims whole nodes: O(1) amortised
        )
        return str(entry_id)

    async def read_loss(
        self,
        session_id: str,
        from_id: str = "0",
        *,
        count: int = 1000,
        block: float | None = None,
    ) -> list[StreamEvent]:
        """Events after stream id ``from_id`` ("0": from the oldest kept; "$": only new ones).

        With ``block`` (seconds), wait up to that long for at least one event (XREAD BLOCK);
        an empty list means none came. The wait is capped below the socket timeout.
        """
        key = self.key(session_id, "loss")
        block_ms: int | None = None
        if block is not None:
            block_ms = max(1, round(min(block, self.op_timeout * 0.8) * 1000))
        reply: Any = await self.redis.xread({key: from_id}, count=count, block=block_ms)
        # RESP2 answers [[key, entries]], RESP3 {key: [entries]}.
        streams = reply.values() if isinstance(reply, dict) else [s[1] for s in reply or []]
        events: list[StreamEvent] = []
        for entries in streams:
            for entry_id, fields in cast(list[tuple[str, dict[str, str]]], entries):
                events.append(stream_event(str(entry_id), fields))
        return events

    async def follow(
        self, session_id: str, from_id: str = "0", *, block: float = 1.0
    ) -> AsyncIterator[StreamEvent]:
        """Every event after ``from_id``, then live ones as they are added, until the consumer
        stops iterating (a WatchLoss on any replica). Raises RedisError while Redis is down;
        the caller resumes from the last event's id."""
        cursor = from_id
        while True:
            for event in await self.read_loss(session_id, cursor, block=block):
                cursor = event.id
                yield event

    async def last_event(self, session_id: str) -> StreamEvent | None:
        """The newest event of the session's stream, or None if it is empty."""
        entries: Any = await self.redis.xrevrange(self.key(session_id, "loss"), count=1)
        if not entries:
            return None
        entry_id, fields = entries[0]
        return stream_event(str(entry_id), fields)

    async def last_stream_id(self, session_id: str) -> str:
        """The id of the newest stream entry ("0" if the stream is empty): a watcher that
        wants only live points starts from here."""
        entries = await self.redis.xrevrange(self.key(session_id, "loss"), count=1)
        return str(entries[0][0]) if entries else "0"


def _loss_fields(
    step: int, loss: float, token: int | None, validation: float | None
) -> dict[FieldT, EncodableT]:
    fields: dict[FieldT, EncodableT] = {"kind": "loss", "step": step, "loss": repr(float(loss))}
    if token is not None:
        fields["token"] = token
    if validation is not None:
        fields["val"] = repr(float(validation))
    return fields


def stream_event(entry_id: str, fields: dict[str, str]) -> StreamEvent:
    kind: EventKind = "restored" if fields.get("kind") == "restored" else "loss"
    loss = float(fields["loss"]) if "loss" in fields else None
    token = int(fields["token"]) if "token" in fields else None
    validation = float(fields["val"]) if "val" in fields else None
    return StreamEvent(entry_id, kind, int(fields["step"]), loss, token, validation)
