"""What cluster mode asks of Redis, measured on a real redis-server on loopback.

Prints, for the coordinator's operations (one client, one call at a time): p50 / p99 latency;
then ops/s with 16 concurrent callers for lease renewal and loss-point appends; then Redis
memory per session (directory entry, lease, token, checkpoint pointer, and a loss stream of
``--points`` points) and per extra loss point. Together they size Redis for N replicas x M
sessions (BENCHMARKS.md does that arithmetic). Starts its own ``redis-server`` (``make deps``)
in a temporary directory with ``appendonly yes`` and stops it. Run:
``python bench/redis_coordinator.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from rnnserve_server.cluster import Coordinator
from rnnserve_server.testing import start_redis


async def latency(name: str, call: Callable[[int], Awaitable[object]], n: int) -> None:
    times = []
    for i in range(n):
        start = time.perf_counter()
        await call(i)
        times.append(time.perf_counter() - start)
    times.sort()
    p50 = statistics.median(times) * 1e6
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))] * 1e6
    print(f"| {name:<28} | {p50:8.0f} | {p99:8.0f} |")


async def throughput(name: str, call: Callable[[int], Awaitable[object]], n: int) -> None:
    async def worker(offset: int) -> None:
        for i in range(offset, n, 16):
            await call(i)

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(16)))
    elapsed = time.perf_counter() - start
    print(f"| {name:<28} | {n / elapsed:10.0f} |")


async def used_memory(coord: Coordinator) -> int:
    info = await coord.redis.info("memory")
    return int(info["used_memory"])


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=2000, help="calls per latency row")
    parser.add_argument("--sessions", type=int, default=5000, help="sessions for the memory row")
    parser.add_argument("--points", type=int, default=100, help="loss points per session")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        redis = start_redis(Path(tmp))
        coord = Coordinator(redis.url, lease_ttl=5.0, stream_maxlen=10_000)
        try:
            await run(coord, args.ops, args.sessions, args.points)
        finally:
            await coord.close()
            redis.stop()


async def run(coord: Coordinator, ops: int, sessions: int, points: int) -> None:
    lease = await coord.acquire("bench", "127.0.0.1:1")
    assert lease is not None
    print(f"redis-server on loopback, appendonly yes; one client, {ops} sequential calls\n")
    print("| operation                    | p50 (us) | p99 (us) |")
    print("|------------------------------|---------:|---------:|")
    await latency("PING", lambda i: coord.redis.ping(), ops)
    await latency("acquire (new session)", lambda i: coord.acquire(f"lat-{i}", "r:1"), ops)
    await latency("renew", lambda i: coord.renew(lease), ops)
    await latency("owner", lambda i: coord.owner("bench"), ops)
    await latency(
        "advance_pointer (fenced)",
        lambda i: coord.advance_pointer("bench", lease.token, f"{lease.token}-{i}.npz"),
        ops,
    )
    await latency("publish_loss (XADD ~MAXLEN)", lambda i: coord.publish_loss("bench", i, 1.0), ops)
    await latency("read_loss 100 (XREAD)", lambda i: coord.read_loss("bench", "0", count=100), ops)

    print("\n16 concurrent callers on one connection pool\n")
    print("| operation                    |      ops/s |")
    print("|------------------------------|-----------:|")
    await throughput("renew", lambda i: coord.renew(lease), ops * 4)
    await throughput("publish_loss", lambda i: coord.publish_loss("tp", i, 1.0), ops * 4)

    await coord.redis.flushdb()
    base = await used_memory(coord)
    for start in range(0, sessions, 500):
        async with coord.redis.pipeline(transaction=False) as pipe:
            for i in range(start, min(start + 500, sessions)):
                sid = f"session-{i:08d}"
                pipe.zadd(coord._directory, {sid: 0})
                pipe.set(coord.key(sid, "lease"), "10.0.0.1:50051|1", px=5000)
                pipe.set(coord.key(sid, "token"), 1)
                pipe.set(coord.key(sid, "ckpt"), "1-123456.npz")
                for step in range(points):
                    pipe.xadd(
                        coord.key(sid, "loss"),
                        {"kind": "loss", "step": step, "loss": repr(2.0 - step * 1e-3)},
                        maxlen=coord.stream_maxlen,
                        approximate=True,
                    )
            await pipe.execute()
    per_session = (await used_memory(coord) - base) / sessions
    stream_key = coord.key("long", "loss")
    before = await used_memory(coord)
    for start in range(0, 10_000, 1000):
        async with coord.redis.pipeline(transaction=False) as pipe:
            for step in range(start, start + 1000):
                pipe.xadd(stream_key, {"kind": "loss", "step": step, "loss": repr(1.2345678)})
            await pipe.execute()
    per_point = (await used_memory(coord) - before) / 10_000
    print(f"\nmemory: {per_session:,.0f} bytes per session ({points} loss points kept), ")
    print(f"        {per_point:,.1f} bytes per further loss point (stream of 10,000)")


if __name__ == "__main__":
    asyncio.run(main())
