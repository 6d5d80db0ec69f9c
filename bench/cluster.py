"""Cluster mode on this machine: a real redis-server and real rnnserve-server replicas on
loopback ports sharing one checkpoint directory.

Prints:

- forwarding overhead: Step p50 / p99 sent to the session's owner vs to a non-owner (which
  forwards it), and a no-op gRPC call (health check) p50 for scale (target: the difference
  is at most one no-op call);
- failover time over ``--trials`` kills: ``kill -9`` the owner of a session while it trains,
  then Step it through a surviving replica until one succeeds (the lease TTL + the restore),
  p50 and max, and the steps lost (the step trained before the kill minus the step restored).

Starts its own ``redis-server`` (``make deps``) and replicas in a temporary directory and stops
them. Run: ``python bench/cluster.py`` (``--trials``, ``--lease-ttl``, ``--steps``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from redis_coordinator import start_redis  # type: ignore[import-not-found]
from rnnserve import Client, RnnServeError

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


class Replica:
    """One rnnserve-server subprocess; ``address`` once it logged ``serving``."""

    def __init__(self, directory: Path, redis_url: str, shared: Path, lease_ttl: float) -> None:
        args = [sys.executable, "-m", "rnnserve_server", "--address", "127.0.0.1:0"]
        args += ["--data-dir", str(directory), "--log-format", "json", "--log-level", "warning"]
        args += ["--redis-url", redis_url, "--shared-dir", str(shared)]
        args += ["--lease-ttl", str(lease_ttl), "--checkpoint-interval", "0.5"]
        port_file = directory.with_suffix(".port")
        args += ["--port-file", str(port_file)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("a replica did not start")
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(0.05)
        self.address = f"127.0.0.1:{port_file.read_text().strip()}"

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


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


def forwarding(replicas: list[Replica], n: int) -> dict[str, float]:
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
        noop = timed(lambda: owner.health(), n)
        session.delete()
    return {
        "owner_p50_ms": statistics.median(owner_times) * 1000,
        "owner_p99_ms": percentile(owner_times, 0.99) * 1000,
        "forwarded_p50_ms": statistics.median(other_times) * 1000,
        "forwarded_p99_ms": percentile(other_times, 0.99) * 1000,
        "noop_p50_ms": statistics.median(noop) * 1000,
    }


def failover(
    root: Path, redis_url: str, shared: Path, lease_ttl: float, trials: int, steps: int
) -> dict[str, float]:
    times: list[float] = []
    lost: list[int] = []
    survivor = Replica(root / "survivor", redis_url, shared, lease_ttl)
    try:
        for trial in range(trials):
            victim = Replica(root / f"victim{trial}", redis_url, shared, lease_ttl)
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
                    except RnnServeError:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--lease-ttl", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=100, help="steps trained before the kill")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rnnserve-bench-cluster-") as tmp:
        root = Path(tmp)
        (root / "redis").mkdir()
        redis, url = start_redis(root / "redis")
        shared = root / "shared"
        replicas: list[Replica] = []
        try:
            replicas = [Replica(root / f"r{i}", url, shared, args.lease_ttl) for i in range(2)]
            results = forwarding(replicas, args.calls)
            for replica in replicas:
                replica.stop()
            replicas = []
            results.update(failover(root, url, shared, args.lease_ttl, args.trials, args.steps))
        finally:
            for replica in replicas:
                replica.stop()
            redis.kill()
            redis.wait(10)
    results["lease_ttl_s"] = args.lease_ttl
    if args.json:
        print(json.dumps(results))
        return
    print(f"Step p50 via the owner      {results['owner_p50_ms']:.2f} ms")
    print(f"Step p50 via a non-owner    {results['forwarded_p50_ms']:.2f} ms (forwarded)")
    overhead = results["forwarded_p50_ms"] - results["owner_p50_ms"]
    print(f"  overhead p50              {overhead:.2f} ms")
    print(f"no-op call (health) p50     {results['noop_p50_ms']:.2f} ms")
    p99 = f"{results['owner_p99_ms']:.2f} / {results['forwarded_p99_ms']:.2f}"
    print(f"Step p99 owner / forwarded  {p99} ms")
    print(
        f"failover (kill -9 -> first Step elsewhere), {args.trials} trials, lease TTL "
        f"{args.lease_ttl:g} s: p50 {results['failover_p50_s']:.2f} s, "
        f"max {results['failover_max_s']:.2f} s; steps lost p50 "
        f"{results['steps_lost_p50']:.0f}, max {results['steps_lost_max']:.0f}"
    )


if __name__ == "__main__":
    main()
