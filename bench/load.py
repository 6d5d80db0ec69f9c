"""Load test: N concurrent clients against a real server for T seconds.

Starts ``rnnserve-server`` itself (a subprocess on a free loopback port, a temporary data
directory, default settings otherwise), then runs N clients (default 64) as asyncio tasks over
grpc.aio. Each client owns one small session and loops until the deadline over a weighted mix of
Step, Generate, Predict, GetSession and WatchLoss (a short history replay, then cancel). Since
every client trains its own session, no error is expected: FAILED_PRECONDITION (two Steps on
one session) cannot happen and any non-OK code counts as unexpected. Prints per-RPC count,
throughput and p50/p99 latency, error counts by status code, and the server's RSS
(/proc/PID/status VmRSS) after warm-up and at the end. Exit status 1 on unexpected errors or
RSS growth of 10 % or more.

    python bench/load.py --clients 64 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the bench package, whichever directory this runs from

import grpc  # noqa: E402
from grpc import aio  # noqa: E402
from rnnserve.v1 import rnn_service_pb2 as pb  # noqa: E402
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc  # noqa: E402
from rnnserve_server.testing import ServerHandle, temporary_server  # noqa: E402

from bench._common import cpu_name  # noqa: E402

TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity. "
) * 20
CONFIG = pb.SessionConfig(hidden_size=32, seq_length=16, batch_size=4, seed=1)
MIX = {"Step": 30, "Generate": 20, "Predict": 20, "GetSession": 20, "WatchLoss": 10}
GENERATE_LENGTH = 100
PREDICT_TEXT = TEXT[:64]
RPC_TIMEOUT = 30.0
EXPECTED: set[grpc.StatusCode] = set()  # every client has its own session: nothing expected


class Stats:
    """Latencies (seconds) and status codes per RPC."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.codes: dict[str, Counter[str]] = defaultdict(Counter)
        self.details: dict[str, str] = {}

    def record(self, rpc: str, seconds: float, code: grpc.StatusCode, details: str = "") -> None:
        self.codes[rpc][code.name] += 1
        if code == grpc.StatusCode.OK:
            self.latency[rpc].append(seconds)
        else:
            self.details.setdefault(f"{rpc} {code.name}", details)


async def one_call(stub: Any, rpc: str, session_id: str, step: int) -> int:
    """One RPC of the mix (stub: an aio RnnServiceStub); streams are read to the end (WatchLoss:
    one message, then cancel). Returns the session's step count after the call."""
    if rpc == "Step":
        response = await stub.Step(pb.StepRequest(session_id=session_id), timeout=RPC_TIMEOUT)
        return int(response.step)
    elif rpc == "Generate":
        request = pb.GenerateRequest(
            session_id=session_id, length=GENERATE_LENGTH, temperature=0.8, seed=step
        )
        async for _ in stub.Generate(request, timeout=RPC_TIMEOUT):
            pass
    elif rpc == "Predict":
        await stub.Predict(
            pb.PredictRequest(session_id=session_id, text=PREDICT_TEXT), timeout=RPC_TIMEOUT
        )
    elif rpc == "GetSession":
        await stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=RPC_TIMEOUT)
    else:  # WatchLoss: replay the last few points of history, then hang up
        call = stub.WatchLoss(
            pb.WatchLossRequest(session_id=session_id, from_step=max(1, step - 20)),
            timeout=RPC_TIMEOUT,
        )
        try:
            async for _ in call:
                break
        finally:
            call.cancel()
    return step


async def client_loop(stub: Any, index: int, deadline: float, stats: Stats, seed: int) -> None:
    """One client: its own session, then the weighted mix until the deadline."""
    rng = random.Random(seed * 1000 + index)
    session_id = f"load-{index}"
    rpcs, weights = list(MIX), list(MIX.values())
    step = int((await stub.GetSession(pb.GetSessionRequest(session_id=session_id))).session.step)
    while time.monotonic() < deadline:
        rpc = rng.choices(rpcs, weights)[0]
        if rpc == "WatchLoss" and step == 0:
            rpc = "Step"  # a watch of an empty history would wait for the next update
        started = time.perf_counter()
        try:
            step = await one_call(stub, rpc, session_id, step)
        except grpc.RpcError as err:
            code = err.code() if isinstance(err.code(), grpc.StatusCode) else None
            stats.record(
                rpc,
                time.perf_counter() - started,
                code or grpc.StatusCode.UNKNOWN,
                str(err.details()),
            )
            continue
        stats.record(rpc, time.perf_counter() - started, grpc.StatusCode.OK)


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def run(server: ServerHandle, clients: int, seconds: float, seed: int) -> int:
    address = server.address
    channels = [aio.insecure_channel(address) for _ in range(min(8, clients))]
    stubs: list[Any] = [pb_grpc.RnnServiceStub(ch) for ch in channels]
    try:
        for index in range(clients):  # set-up, not measured
            await stubs[index % len(stubs)].CreateSession(
                pb.CreateSessionRequest(session_id=f"load-{index}", text=TEXT, config=CONFIG),
                timeout=RPC_TIMEOUT,
            )
        warm = Stats()
        await asyncio.gather(
            *(
                client_loop(stubs[i % len(stubs)], i, time.monotonic() + 3.0, warm, seed + 1)
                for i in range(clients)
            )
        )
        rss_before = server.rss_bytes() // 1024
        stats = Stats()
        started = time.monotonic()
        await asyncio.gather(
            *(
                client_loop(stubs[i % len(stubs)], i, started + seconds, stats, seed)
                for i in range(clients)
            )
        )
        elapsed = time.monotonic() - started
        rss_after = server.rss_bytes() // 1024
    finally:
        for ch in channels:
            await ch.close(None)
    return report(stats, warm, clients, elapsed, rss_before, rss_after)


def report(
    stats: Stats, warm: Stats, clients: int, elapsed: float, rss_before: int, rss_after: int
) -> int:
    print(f"rnnserve load: {clients} clients, {elapsed:.1f} s, {os.cpu_count()} CPUs, {cpu_name()}")
    print(f"mix: {', '.join(f'{k} {v}%' for k, v in MIX.items())}; one session per client")
    print()
    print(f"{'RPC':<11} {'calls':>8} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    total_ok = total_err = unexpected = 0
    errors: Counter[str] = Counter()
    for rpc in MIX:
        lat = stats.latency.get(rpc, [])
        codes = stats.codes.get(rpc, Counter())
        n_err = sum(v for k, v in codes.items() if k != "OK")
        total_ok += len(lat)
        total_err += n_err
        for code, count in codes.items():
            if code != "OK":
                errors[code] += count
                if grpc.StatusCode[code] not in EXPECTED:
                    unexpected += count
        print(
            f"{rpc:<11} {len(lat) + n_err:>8} {len(lat) / elapsed:>8.1f} "
            f"{percentile(lat, 0.5) * 1000:>8.2f} {percentile(lat, 0.99) * 1000:>8.2f} {n_err:>7}"
        )
    print(f"{'all':<11} {total_ok + total_err:>8} {total_ok / elapsed:>8.1f}")
    print()
    print("errors by status code:", dict(errors) if errors else "none")
    for key, details in stats.details.items():
        print(f"  first {key}: {details}")
    warm_errors = sum(v for c in warm.codes.values() for k, v in c.items() if k != "OK")
    print(f"warm-up errors (3 s, not counted above): {warm_errors}")
    growth = (rss_after - rss_before) / rss_before * 100
    print(
        f"server RSS: {rss_before / 1024:.1f} MiB after warm-up, {rss_after / 1024:.1f} MiB at "
        f"the end ({growth:+.1f} %)"
    )
    ok = unexpected == 0 and warm_errors == 0 and growth < 10.0
    print(f"target (0 unexpected errors, RSS growth < 10 %): {'met' if ok else 'MISSED'}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (64)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured duration (60)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the RPC mix")
    parser.add_argument("--log-level", default="info", help="server log level (info)")
    args = parser.parse_args()
    with temporary_server(log_level=args.log_level) as server:
        code = asyncio.run(run(server, args.clients, args.seconds, args.seed))
        exit_code = server.stop()
        print(f"server exit status after SIGTERM: {exit_code}")
    return code if exit_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
