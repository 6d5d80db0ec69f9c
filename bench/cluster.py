"""Cluster mode on this machine: a real redis-server and real rnnserve-server replicas on
loopback ports sharing one checkpoint directory.

Prints:

- forwarding overhead: Step p50 / p99 and GetSession p50 sent to the session's owner vs to a
  non-owner (which forwards it), and a no-op gRPC call (health check) p50 for scale (target:
  the difference is at most one no-op call); the non-owner's CPU per forwarded call vs per
  no-op call, and the owner's CPU per Step on each path (from /proc);
- failover time over ``--trials`` kills: ``kill -9`` the owner of a session while it trains,
  then Step it through a surviving replica until one succeeds (the lease TTL + the restore),
  p50 and max, and the steps lost (the step trained before the kill minus the step restored);
- training jobs with no client connected, ``--trials`` of each: ``kill -9`` the replica
  running the job, or SIGTERM it (drain), then time until the job trains again elsewhere
  (the first loss point another replica puts on the session's Redis stream: for a kill the
  lease TTL, a claim interval and the restore; for a drain the drain and a claim interval),
  p50 and max (target for the kill: <= 5 s at the default TTL);
- throughput: aggregate training chars/s (hidden 512, batch 32, seq 100), from the Train
  messages (steps done over the server's elapsed seconds, per session, summed): one session
  on one replica; two sessions on one replica (the one-server reference); two sessions on two
  replicas, one each (target >= 1.6x one session, as two sessions in one process); both Trains
  sent to one replica with the second session owned by the other (every message forwarded);
  and plain threads in this process (what the cores allow at that moment). Rounds alternate,
  best of ``--rounds``, every round printed;
- watch: 3 replicas x ``--watchers`` WatchLoss streams (client library, asyncio) on one
  session owned by the first replica: loss points/s delivered while it trains flat out
  (Train with a message per step), and the delay from the trainer's client receiving a step
  (Train message, or Step response at ~20 Hz) to each watcher receiving that step's point,
  p50 / p99 per replica; the same with one watcher per replica as the reference; the CPU
  seconds each replica and this process used while it trained.

Every replica and this process use one BLAS thread. Starts its own ``redis-server`` (``make
deps``) and replicas in a temporary directory and stops them. Run: ``python bench/cluster.py``
(all parts, ~4 minutes on 2 cores), ``--only forward,throughput`` for a subset; ``--trials``,
``--lease-ttl``, ``--steps``, ``--seconds``, ``--rounds``, ``--watchers``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the bench package, whichever directory this runs from

# First: one BLAS thread (OPENBLAS/OMP/MKL_NUM_THREADS) before numpy is imported.
import bench._blas  # noqa: E402, F401

# isort: split
from rnnserve import Client, RnnServeError  # noqa: E402
from rnnserve import aio as rnn_aio  # noqa: E402
from rnnserve_server.engine.model_config import PRESETS  # noqa: E402
from rnnserve_server.testing import ServerHandle, start_redis  # noqa: E402

from bench._common import (  # noqa: E402
    TEXT,
    config_kwargs,
    cpu_name,
    load_text,
    local_parallel,
    start_replica,
    trainer_for,
    wait_idle,
)

PARTS = ("forward", "failover", "jobs", "throughput", "watch")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(call: object, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return times


def forwarding(replicas: list[ServerHandle], n: int) -> dict[str, float]:
    """Step and GetSession via the owner and via a non-owner, interleaved; a no-op call; and
    the non-owner's CPU per forwarded call against its CPU per no-op call."""
    with Client(replicas[0].address) as owner, Client(replicas[1].address) as other:
        session = owner.create_session(TEXT, session_id="bench-fwd", hidden_size=64, seed=1)
        session.step()  # replica 0 owns it
        via_other = other.session("bench-fwd")
        for _ in range(20):  # warm both paths (channels, caches)
            session.step()
            via_other.step()
        owner_times, other_times = [], []
        for _ in range(n):  # interleaved: both paths see the same machine load
            owner_times += timed(session.step, 1)
            other_times += timed(via_other.step, 1)
        # GetSession: the same hop without a Step's work (and its checkpoint) on the owner.
        get_owner, get_other = [], []
        for _ in range(n):
            get_owner += timed(session.info, 1)
            get_other += timed(via_other.info, 1)
        noop = timed(lambda: owner.health(), n)
        pid = replicas[1].process.pid
        cpu0 = cpu_seconds(pid)
        timed(via_other.info, n)
        cpu_forward = (cpu_seconds(pid) - cpu0) / n
        cpu0 = cpu_seconds(pid)
        timed(lambda: other.health(), n)
        cpu_noop = (cpu_seconds(pid) - cpu0) / n
        # The owner's CPU per Step, each path on its own (its checkpoint writes included: a
        # write starts after a Step unless one is in flight, so slower calls mean more).
        owner_pid = replicas[0].process.pid
        owner_cpu = []
        for step in (session.step, via_other.step):
            cpu0 = cpu_seconds(owner_pid)
            timed(step, n)
            owner_cpu.append((cpu_seconds(owner_pid) - cpu0) / n)
        session.delete()
    return {
        "owner_p50_ms": statistics.median(owner_times) * 1000,
        "owner_p99_ms": percentile(owner_times, 0.99) * 1000,
        "forwarded_p50_ms": statistics.median(other_times) * 1000,
        "forwarded_p99_ms": percentile(other_times, 0.99) * 1000,
        "get_owner_p50_ms": statistics.median(get_owner) * 1000,
        "get_forwarded_p50_ms": statistics.median(get_other) * 1000,
        "noop_p50_ms": statistics.median(noop) * 1000,
        "nonowner_cpu_forward_ms": cpu_forward * 1000,
        "nonowner_cpu_noop_ms": cpu_noop * 1000,
        "owner_cpu_step_direct_ms": owner_cpu[0] * 1000,
        "owner_cpu_step_forwarded_ms": owner_cpu[1] * 1000,
    }


def failover(
    root: Path, redis_url: str, shared: Path, lease_ttl: float, trials: int, steps: int
) -> dict[str, float]:
    times: list[float] = []
    lost: list[int] = []
    survivor = start_replica(root / "survivor", redis_url, shared, lease_ttl)
    try:
        for trial in range(trials):
            victim = start_replica(root / f"victim{trial}", redis_url, shared, lease_ttl)
            session_id = f"bench-fo{trial}"
            with Client(victim.address, timeout=None) as client:
                session = client.create_session(TEXT, session_id=session_id, hidden_size=64)
                stream = session.train(10**6, report_every=5)
                seen = 0
                for message in stream:
                    seen = message.step
                    if seen >= steps:
                        break
                killed = time.perf_counter()
                victim.kill()
            with Client(survivor.address, timeout=5) as other:
                stop = threading.Event()
                while True:
                    try:
                        restored = other.session(session_id).step().step - 1
                        break
                    except RnnServeError as error:
                        if time.perf_counter() - killed > 10 * lease_ttl + 30:
                            raise SystemExit(f"no replica took the session over: {error}") from None
                        stop.wait(0.01)
                times.append(time.perf_counter() - killed)
                lost.append(max(0, seen - restored))
    finally:
        survivor.stop()
    return {
        "failover_p50_s": statistics.median(times),
        "failover_max_s": max(times),
        "steps_lost_p50": statistics.median(lost),
        "steps_lost_max": max(lost),
    }


def job_failover(
    root: Path, redis_url: str, shared: Path, lease_ttl: float, trials: int, steps: int
) -> dict[str, float]:
    """Per trial, a training job with no client connected: ``kill -9`` its replica, or
    SIGTERM it (drain), and time until the job's first loss point from another replica."""
    import redis as redis_lib

    times: dict[str, list[float]] = {"kill": [], "drain": []}
    survivors = [
        start_replica(root / f"job-survivor{i}", redis_url, shared, lease_ttl) for i in (0, 1)
    ]
    stream = redis_lib.Redis.from_url(redis_url, decode_responses=True)
    try:
        for trial in range(2 * trials):
            how = "kill" if trial % 2 == 0 else "drain"
            victim = start_replica(root / f"job-victim{trial}", redis_url, shared, lease_ttl)
            session_id = f"bench-job{trial}"
            key = f"rnnserve:s:{{{session_id}}}:loss"
            with Client(victim.address, timeout=30) as client:
                session = client.create_session(TEXT, session_id=session_id, hidden_size=64)
                job = session.start_training(10**6, report_every=50)
            while True:  # the job trains on the victim, no client connected
                last: Any = stream.xrevrange(key, count=1)
                if last and int(last[0][1].get("step", 0)) >= steps:
                    break
                time.sleep(0.01)
            started = time.perf_counter()
            if how == "kill":
                victim.kill()
            else:
                victim.process.send_signal(signal.SIGTERM)
            # The victim's own last points come first (a drain publishes them): wait for one
            # published under another lease, i.e. by the replica that took the job over.
            cursor, deadline = str(last[0][0]), started + 10 * lease_ttl + 30
            token = int(last[0][1].get("token", 0))
            while True:
                read: Any = stream.xread({key: cursor}, block=100)
                entries = read[0][1] if read else []
                if any(
                    f.get("kind") == "loss" and int(f.get("token", 0)) != token for _, f in entries
                ):
                    break
                cursor = str(entries[-1][0]) if entries else cursor
                if time.perf_counter() > deadline:
                    raise SystemExit("no replica took the job over")
            times[how].append(time.perf_counter() - started)
            victim.wait()
            with Client(survivors[0].address, timeout=30) as client:
                client.session(session_id).job(job.name).stop()  # its slot is free again
    finally:
        stream.close()
        for survivor in survivors:
            survivor.stop()
    return {
        f"job_{how}_{stat}_s": f(values)
        for how, values in times.items()
        for stat, f in (("p50", statistics.median), ("max", max))
    }


# -- throughput ---------------------------------------------------------------------------

BIG = PRESETS["default"].replace(
    cell="rnn", num_layers=1, dropout=0.0, hidden_size=512, batch_size=32, seq_length=100, seed=1
)


def train_rate(jobs: list[tuple[str, str]], warmup: float, seconds: float) -> list[float]:
    """Aggregate chars/s of the sessions ``(address, session_id)`` training at once, each
    through the given replica, from their Train messages: per session, the steps done between
    its first message after the warm-up and its last, over the server's elapsed seconds
    between the two (a forwarded stream may deliver messages in bursts, so the client's
    receive times would not do); one rate per session (their sum is the aggregate)."""
    clients = {address: Client(address, timeout=None) for address, _ in jobs}
    records: list[list[tuple[float, int, float]]] = [[] for _ in jobs]
    streams = [clients[a].session(sid).train(1_000_000, report_every=2) for a, sid in jobs]
    errors: list[BaseException] = []

    def follow(i: int) -> None:
        try:
            for m in streams[i]:
                records[i].append((time.perf_counter(), m.steps_done, m.elapsed_seconds))
        except RnnServeError as error:
            if "cancel" not in str(error).lower():
                errors.append(error)

    threads = [threading.Thread(target=follow, args=(i,), daemon=True) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    start = time.perf_counter() + warmup
    time.sleep(warmup + seconds)
    for stream in streams:
        stream.cancel()
    for thread in threads:
        thread.join(30)
    for address, sid in jobs:
        wait_idle(clients[address].session(sid))
    for client in clients.values():
        client.close()
    rates = []
    chars_per_step = BIG.batch_size * BIG.seq_length
    for record in records:
        window = [(done, elapsed) for t, done, elapsed in record if t >= start]
        if len(window) < 2:
            raise SystemExit(f"a Train sent fewer than 2 messages in the window: {errors}")
        (s0, e0), (s1, e1) = window[0], window[-1]
        rates.append((s1 - s0) * chars_per_step / (e1 - e0))
    return rates


def throughput(
    replicas: list[ServerHandle], seconds: float, rounds: int, text: str
) -> dict[str, float]:
    r0, r1 = replicas[0].address, replicas[1].address
    owners = {"tp-a": r0, "tp-b": r0, "tp-c": r1}
    for sid, address in owners.items():
        with Client(address, timeout=None) as client:
            session = client.create_session(text, session_id=sid, **config_kwargs(BIG))
            session.train(4).wait()  # activated (and owned) where it was created
    configs = {
        "one_replica_1": [(r0, "tp-a")],
        "one_replica_2": [(r0, "tp-a"), (r0, "tp-b")],
        "two_replicas_2": [(r0, "tp-a"), (r1, "tp-c")],
        "two_replicas_2_forwarded": [(r0, "tp-a"), (r0, "tp-c")],
    }
    trainers = [trainer_for(BIG, text) for _ in range(2)]
    for trainer in trainers:
        trainer.step()
    every: dict[str, list[list[float]]] = {name: [] for name in configs}
    every |= {"in_process_1": [], "in_process_2": []}
    for _ in range(rounds):  # alternate, best of rounds: the machine is shared
        for name, jobs in configs.items():
            every[name].append(train_rate(jobs, 1.0, seconds))
        for n in (1, 2):
            every[f"in_process_{n}"].append([local_parallel(trainers[:n], seconds)])
    for sid, address in owners.items():
        with Client(address) as client:
            client.session(sid).delete()
    out: dict[str, Any] = {f"tp_{name}": max(map(sum, r)) for name, r in every.items()}
    out["tp_rounds"] = every  # per round, per session
    return out


# -- WatchLoss fan-out ------------------------------------------------------------------------


class Watchers:
    """``n`` WatchLoss streams per address on one session, through the asyncio client library
    in one event loop on a thread here. ``received[r][i][step]``: when watcher i on replica r
    got that step's point (perf_counter)."""

    def __init__(self, addresses: list[str], session_id: str, n: int, from_step: int) -> None:
        self.received: list[list[dict[int, float]]] = [[{} for _ in range(n)] for _ in addresses]
        self._args = (addresses, session_id, n, from_step)
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        self._ready.wait(30)

    async def _run(self) -> None:
        addresses, session_id, n, from_step = self._args
        clients = [rnn_aio.Client(address, timeout=None) for address in addresses]
        streams = [
            [clients[r].session(session_id).watch_loss(from_step) for _ in range(n)]
            for r in range(len(addresses))
        ]

        async def follow(stream: Any, got: dict[int, float]) -> None:
            with contextlib.suppress(RnnServeError, asyncio.CancelledError):
                async for point in stream:
                    got[point.step] = time.perf_counter()

        tasks = [
            asyncio.create_task(follow(stream, self.received[r][i]))
            for r, per_replica in enumerate(streams)
            for i, stream in enumerate(per_replica)
        ]
        self._ready.set()
        while not self._stop.is_set():
            await asyncio.sleep(0.05)
        for per_replica in streams:
            for stream in per_replica:
                stream.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()

    def has(self, step: int) -> bool:
        return all(step in got for per_replica in self.received for got in per_replica)

    def wait_for(self, step: int, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.has(step):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def delays(self, sent: dict[int, float]) -> tuple[list[list[float]], int]:
        """Per replica: seconds from ``sent[step]`` to each watcher having that step; and how
        many (watcher, step) pairs never arrived."""
        out: list[list[float]] = []
        missing = 0
        for per_replica in self.received:
            values = []
            for got in per_replica:
                for step, t in sent.items():
                    if step in got:
                        values.append(got[step] - t)
                    else:
                        missing += 1
            out.append(values)
        return out, missing

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_shares(replicas: list[ServerHandle]) -> list[float]:
    """CPU seconds so far: each replica, then this process (client, watchers)."""
    return [cpu_seconds(r.process.pid) for r in replicas] + [cpu_seconds(os.getpid())]


def stepped(client: Client, session_id: str, steps: int) -> dict[int, float]:
    """Step at ~20 Hz; when each Step's response arrived, by step."""
    sent = {}
    session = client.session(session_id)
    for _ in range(steps):
        response = session.step()
        sent[response.step] = time.perf_counter()
        time.sleep(0.05)
    time.sleep(0.5)
    return sent


def trained(client: Client, session_id: str, seconds: float) -> dict[int, float]:
    """Train flat out for ``seconds`` with a message per step; when each step's message
    arrived, by step."""
    sent: dict[int, float] = {}
    stream = client.session(session_id).train(1_000_000, report_every=1)

    def follow() -> None:
        with contextlib.suppress(RnnServeError):
            for message in stream:
                sent[message.step] = time.perf_counter()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    time.sleep(seconds)
    stream.cancel()
    thread.join(30)
    wait_idle(client.session(session_id))
    return sent


def ms_pcts(values: list[float]) -> tuple[float, float]:
    return statistics.median(values) * 1000, percentile(values, 0.99) * 1000


def watch(replicas: list[ServerHandle], n: int, seconds: float, text: str) -> dict[str, Any]:
    addresses = [r.address for r in replicas]
    sid = "bench-watch"
    config = PRESETS["default"].replace(
        cell="rnn", num_layers=1, dropout=0.0, hidden_size=32, seed=1
    )
    out: dict[str, Any] = {}
    with Client(addresses[0], timeout=None) as client:
        client.create_session(text, session_id=sid, **config_kwargs(config))
        client.session(sid).train(20).wait()
        cpu0 = cpu_shares(replicas)
        alone = trained(client, sid, seconds)
        out["watch_cpu_alone"] = [b - a for a, b in zip(cpu0, cpu_shares(replicas), strict=True)]
        out["watch_steps_per_s_alone"] = len(alone) / seconds
        for label, count in (("one", 1), ("many", n)):
            step = client.session(sid).step().step
            watchers = Watchers(addresses, sid, count, step + 1)
            client.session(sid).step()
            if not watchers.wait_for(step + 1):
                raise SystemExit("the watchers did not all start within 30 s")
            sent = stepped(client, sid, int(seconds * 20))
            delays, missing = watchers.delays(sent)
            out[f"watch_{label}_step_ms"] = [ms_pcts(d) for d in delays]
            out[f"watch_{label}_step_missing"] = missing
            if count == n:
                first = client.session(sid).info().step
                before = sum(len(got) for per in watchers.received for got in per)
                t0 = time.perf_counter()
                cpu0 = cpu_shares(replicas)
                sent = trained(client, sid, seconds)
                cpu1 = cpu_shares(replicas)
                out["watch_cpu"] = [b - a for a, b in zip(cpu0, cpu1, strict=True)]
                last = client.session(sid).info().step
                watchers.wait_for(last, timeout=30)  # every point delivered (or 30 s)
                after = sum(len(got) for per in watchers.received for got in per)
                out["watch_steps_per_s"] = len(sent) / seconds
                out["watch_points_per_s"] = (after - before) / (time.perf_counter() - t0)
                out["watch_points_expected"] = (last - first) * len(addresses) * n
                out["watch_points_got"] = after - before
                delays, missing = watchers.delays(sent)
                out["watch_train_ms"] = [ms_pcts(d) for d in delays]
                out["watch_train_missing"] = missing
            watchers.close()
        client.session(sid).delete()
    return out


def print_watch(results: dict[str, Any], n: int) -> None:
    def per_replica(rows: list[tuple[float, float]]) -> str:
        return ", ".join(
            f"{'owner' if r == 0 else f'replica {r}'} {p50:.1f} / {p99:.1f}"
            for r, (p50, p99) in enumerate(rows)
        )

    alone = results["watch_steps_per_s_alone"]
    print(
        f"WatchLoss, 3 replicas x {n} watchers, hidden 32: training "
        f"{results['watch_steps_per_s']:,.0f} steps/s (alone {alone:,.0f}); "
        f"points delivered {results['watch_points_per_s']:,.0f}/s "
        f"({results['watch_points_got']:,} of {results['watch_points_expected']:,})"
    )

    def cpu(values: list[float]) -> str:
        names = ["owner"] + [f"replica {r}" for r in range(1, len(values) - 1)] + ["bench"]
        return ", ".join(f"{name} {v:.1f}" for name, v in zip(names, values, strict=True))

    print(f"  CPU seconds in the Train window: {cpu(results['watch_cpu'])}")
    print(f"  (Train alone, no watchers:       {cpu(results['watch_cpu_alone'])})")
    print(
        f"  delay Train message -> watcher, ms p50 / p99: {per_replica(results['watch_train_ms'])}"
    )
    many = per_replica(results["watch_many_step_ms"])
    print(
        f"  delay Step response (~20 Hz) -> watcher, ms p50 / p99: {many}"
        f" (missing {results['watch_many_step_missing']})"
    )
    print(
        f"  same, 1 watcher per replica: {per_replica(results['watch_one_step_ms'])}"
        f" (missing {results['watch_one_step_missing']})"
    )


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default=",".join(PARTS), help="comma-separated: " + ",".join(PARTS)
    )
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument(
        "--lease-ttl", type=float, default=3.0, help="seconds (default 3: the server's default)"
    )
    parser.add_argument("--steps", type=int, default=100, help="steps trained before the kill")
    parser.add_argument("--seconds", type=float, default=4.0, help="per throughput/watch window")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (best of)")
    parser.add_argument("--watchers", type=int, default=50, help="WatchLoss streams per replica")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    assert os.environ.get("OPENBLAS_NUM_THREADS") == "1"  # set by importing bench._blas
    only = set(args.only.split(","))
    if only - set(PARTS):
        parser.error(f"--only: unknown part(s) {sorted(only - set(PARTS))}")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name()}
    meta["cores"] = str(os.cpu_count())
    meta["load_start"] = load_average()
    results: dict[str, Any] = {}
    text = load_text()
    with tempfile.TemporaryDirectory(prefix="rnnserve-bench-cluster-") as tmp:
        root = Path(tmp)
        redis = start_redis(root / "redis")
        url = redis.url
        shared = root / "shared"
        replicas: list[ServerHandle] = []
        try:
            # (part, replicas, checkpoint interval, measurement); throughput and fan-out run at
            # the default checkpoint interval, what a deployment would run.
            parts: list[tuple[str, int, float, Callable[[list[ServerHandle]], Any]]] = [
                ("forward", 2, 0.5, lambda r: forwarding(r, args.calls)),
                ("throughput", 2, 5.0, lambda r: throughput(r, args.seconds, args.rounds, text)),
                ("watch", 3, 5.0, lambda r: watch(r, args.watchers, args.seconds, text)),
            ]
            for part, count, interval, measure in parts:
                if part not in only:
                    continue
                replicas = [
                    start_replica(root / f"{part}{i}", url, shared, args.lease_ttl, interval)
                    for i in range(count)
                ]
                results.update(measure(replicas))
                for replica in replicas:
                    replica.stop()
                replicas = []
            if "failover" in only:
                results.update(failover(root, url, shared, args.lease_ttl, args.trials, args.steps))
            if "jobs" in only:
                results.update(
                    job_failover(root, url, shared, args.lease_ttl, args.trials, args.steps)
                )
        finally:
            for replica in replicas:
                replica.kill()  # left running only by an error
            redis.kill()
    meta["load_end"] = load_average()
    results["lease_ttl_s"] = args.lease_ttl
    if args.json:
        print(json.dumps(results | meta))
        return
    print(f"{meta['date']}  CPU: {meta['cpu']} x{meta['cores']}; one BLAS thread everywhere")
    print(f"load average at start {meta['load_start']}, at end {meta['load_end']}")
    if "forward" in only:
        print(f"Step p50 via the owner      {results['owner_p50_ms']:.2f} ms")
        print(f"Step p50 via a non-owner    {results['forwarded_p50_ms']:.2f} ms (forwarded)")
        overhead = results["forwarded_p50_ms"] - results["owner_p50_ms"]
        print(f"  overhead p50              {overhead:.2f} ms")
        print(f"no-op call (health) p50     {results['noop_p50_ms']:.2f} ms")
        p99 = f"{results['owner_p99_ms']:.2f} / {results['forwarded_p99_ms']:.2f}"
        print(f"Step p99 owner / forwarded  {p99} ms")
        get = f"{results['get_owner_p50_ms']:.2f} / {results['get_forwarded_p50_ms']:.2f}"
        print(f"GetSession p50 owner / forwarded  {get} ms")
        cpu = f"{results['nonowner_cpu_forward_ms']:.3f} / {results['nonowner_cpu_noop_ms']:.3f}"
        print(f"non-owner CPU per forwarded GetSession / per no-op call  {cpu} ms")
        cpu = (
            f"{results['owner_cpu_step_direct_ms']:.2f} / "
            f"{results['owner_cpu_step_forwarded_ms']:.2f}"
        )
        print(f"owner CPU per Step sent to it / forwarded to it  {cpu} ms")
    if "throughput" in only:
        base = results["tp_one_replica_1"]
        local = results["tp_in_process_1"]
        print(f"aggregate Train chars/s, hidden 512 batch 32 seq 100 (best of {args.rounds}):")
        for name, label in (
            ("one_replica_1", "1 replica, 1 session"),
            ("one_replica_2", "1 replica, 2 sessions"),
            ("two_replicas_2", "2 replicas, 1 session each"),
            ("two_replicas_2_forwarded", "2 replicas, both Trains sent to one (1 forwarded)"),
        ):
            rate = results[f"tp_{name}"]
            rounds = "; ".join(
                " + ".join(f"{r / 1000:.1f}k" for r in per_session)
                for per_session in results["tp_rounds"][name]
            )
            print(f"  {label:<52} {rate:>9,.0f} ({rate / base:.2f}x)  rounds: {rounds}")
        for n in (1, 2):
            rate = results[f"tp_in_process_{n}"]
            print(f"  {f'in this process, {n} thread(s)':<52} {rate:>9,.0f} ({rate / local:.2f}x)")
    if "watch" in only:
        print_watch(results, args.watchers)
    if "failover" in only:
        print(
            f"failover (kill -9 -> first Step elsewhere), {args.trials} trials, lease TTL "
            f"{args.lease_ttl:g} s: p50 {results['failover_p50_s']:.2f} s, "
            f"max {results['failover_max_s']:.2f} s; steps lost p50 "
            f"{results['steps_lost_p50']:.0f}, max {results['steps_lost_max']:.0f}"
        )
    if "jobs" in only:
        for how, what in (("kill", "kill -9"), ("drain", "SIGTERM (drain)")):
            print(
                f"training job, no client: {what} -> training elsewhere, {args.trials} trials, "
                f"lease TTL {args.lease_ttl:g} s: p50 {results[f'job_{how}_p50_s']:.2f} s, "
                f"max {results[f'job_{how}_max_s']:.2f} s"
            )


if __name__ == "__main__":
    main()
