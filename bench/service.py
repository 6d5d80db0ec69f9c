"""What the service costs on top of the engine: every row a ratio measured in this one run.

A real ``rnnserve-server`` subprocess on a loopback port (started like the tests do: port 0,
the port read from its ``serving`` log event) and this process as the client, next to the same
engine called in-process here. Rows:

- floor: a no-op unary call (grpc.health.v1 Check) and a no-op server stream (health Watch:
  time to its first message) between the two processes. Every latency row is read against it.
- step: Step round-trip p50/p99 minus ``Trainer.step`` in-process, hidden 32 and the default
  preset; what rnnserve adds beyond the floor, as a share of the floor (target <= 25 % p50).
- train: chars/s through the Train stream vs a ``Trainer.step`` loop (target >= 95 %).
- generate: chars/s received by the client vs ``Trainer.sample`` in-process (target >= 90 %).
- sessions: server RSS with 1,000 and 10,000 resident sessions at hidden 100 (target: 10,000
  in <= 2 GiB), CreateSession / GetSession latency at that scale, ListSessions over all.
- parallel: aggregate chars/s of 2 and 4 sessions training at once vs 1 (target >= 1.6x for 2).
- watch: 100 WatchLoss streams on one training session: points/s delivered, what they cost the
  training, and the delay from a Step's response to each watcher having its point.

Both sides use the same number of BLAS threads (``--blas-threads``, default 1 as the server).
Run: ``python bench/service.py`` (a few minutes), ``--quick`` for a smoke run, ``--only ROWS``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the bench package, whichever directory this runs from

# First: it sets the BLAS threads (--blas-threads) before numpy is imported.
from bench._blas import BLAS_THREADS  # noqa: E402

# isort: split
import grpc  # noqa: E402
import numpy as np  # noqa: E402
from grpc import aio  # noqa: E402
from grpc_health.v1 import health_pb2  # noqa: E402
from rnnserve import Client  # noqa: E402
from rnnserve.v1 import rnn_service_pb2 as pb  # noqa: E402
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc  # noqa: E402
from rnnserve_server.engine.model_config import PRESETS  # noqa: E402
from rnnserve_server.engine.trainer import Trainer  # noqa: E402
from rnnserve_server.testing import ServerHandle, temporary_server  # noqa: E402

from bench._common import (  # noqa: E402
    config_kwargs,
    cpu_name,
    load_text,
    local_parallel,
    trainer_for,
    wait_idle,
)

ROWS = ("floor", "step", "train", "generate", "sessions", "parallel", "watch")
# The tanh RNN the engine rows measure at their large shape (one layer, no dropout).
BIG_TANH = PRESETS["default"].replace(
    cell="rnn", num_layers=1, dropout=0.0, hidden_size=512, batch_size=32, seq_length=100, seed=1
)


def server(**settings: Any) -> AbstractContextManager[ServerHandle]:
    """A server with this process's BLAS threads on a fresh temporary directory, stopped at
    the end; its log goes to a file, read only when asked."""
    return temporary_server(blas_threads=BLAS_THREADS, **settings)


def logged_durations(srv: ServerHandle, method: str, session_id: str) -> list[float]:
    """Seconds of each ``method`` call on the session, from the server's rpc log lines."""
    return [
        float(entry["duration_ms"]) / 1000
        for entry in srv.logs
        if entry.get("event") == "rpc"
        and entry.get("session_id") == session_id
        and str(entry.get("method", "")).endswith("/" + method)
    ]


# ---------------------------------------------------------------------------------------------
# Measuring


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of values, by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def timed(fn: Callable[[], Any], n: int, warmup: int = 20) -> list[float]:
    """Seconds of each of n calls of fn, after warmup calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleaved(fns: list[Callable[[], Any]], n: int, warmup: int = 20) -> list[list[float]]:
    """Like timed, for several functions called in turn, so load changes hit them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(n):
        for fn, times in zip(fns, out, strict=True):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return out


@dataclass
class Row:
    """One line of the table: what, ours, the reference, the ratio and the target verdict."""

    section: str
    what: str
    value: str
    reference: str = ""
    ratio: str = ""
    target: str = ""
    ok: bool | None = None
    notes: list[str] = field(default_factory=list)


ROWS_OUT: list[Row] = []


def row(*args: Any, **kwargs: Any) -> Row:
    r = Row(*args, **kwargs)
    ROWS_OUT.append(r)
    verdict = "" if r.ok is None else ("  [met]" if r.ok else "  [MISSED]")
    print(
        f"  {r.what}: {r.value}"
        + (f" vs {r.reference}" if r.reference else "")
        + (f" -> {r.ratio}" if r.ratio else "")
        + verdict,
        flush=True,
    )
    return r


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.3f} ms"


def drain(stream: Iterator[Any]) -> None:
    """Read a stream to its end (a cancel ends it quietly)."""
    for _ in stream:
        pass


# ---------------------------------------------------------------------------------------------
# Rows


@dataclass
class Floor:
    unary_p50: float = 0.0
    unary_p99: float = 0.0
    stream_p50: float = 0.0


def health_check(address: str) -> tuple[grpc.Channel, Callable[[], Any]]:
    """A channel and a raw grpc.health.v1 Check on it (no client-library code in the path)."""
    channel = grpc.insecure_channel(address)
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    request = health_pb2.HealthCheckRequest()
    return channel, lambda: check(request)


def spin(seconds: float) -> None:
    """Keep this thread busy for ``seconds`` (as an in-process step would)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def bench_floor(srv: ServerHandle, n: int) -> Floor:
    print("floor: no-op calls between two processes on loopback", flush=True)
    channel, check = health_check(srv.address)
    watch = channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )

    def first_of_stream() -> None:
        call: Any = watch(health_pb2.HealthCheckRequest())
        next(call)
        call.cancel()

    unary, streams = interleaved([check, first_of_stream], n)
    f = Floor(pct(unary, 50), pct(unary, 99), pct(streams, 50))
    row("floor", "unary no-op (health Check) p50 / p99", f"{ms(f.unary_p50)} / {ms(f.unary_p99)}")
    row(
        "floor",
        "stream no-op (health Watch, first message) p50 / p99",
        f"{ms(f.stream_p50)} / {ms(pct(streams, 99))}",
    )
    # The floor depends on how long both sides were idle before the call (wake-ups on a
    # shared VM): a call after a few ms of other work costs more than one back to back.
    for gap in (0.004, 0.012):

        def after_work(gap: float = gap) -> None:
            spin(gap)
            check()

        after = [t - gap for t in timed(after_work, max(50, n // 4))]
        row(
            "floor",
            f"unary no-op right after {gap * 1000:.0f} ms of client work, p50",
            ms(pct(after, 50)),
            ratio=f"{pct(after, 50) / f.unary_p50:.2f}x back to back",
        )
    channel.close()
    return f


def bench_step(srv: ServerHandle, floor: Floor, text: str, n: int) -> None:
    print("step: Step RPC round trip vs Trainer.step in-process", flush=True)
    tiny = PRESETS["default"].replace(cell="rnn", num_layers=1, dropout=0.0, hidden_size=32, seed=1)
    default = PRESETS["default"].replace(seed=1)
    channel, check = health_check(srv.address)
    with Client(srv.address) as client:
        for name, config in (("hidden 32", tiny), ("default", default)):
            session = client.create_session(
                text, session_id=f"step-{config.hidden_size}", **config_kwargs(config)
            )
            trainer = trainer_for(config, text)

            def step_then_noop(trainer: Trainer = trainer) -> None:
                trainer.step()
                check()

            rpc, local, both = interleaved([session.step, trainer.step, step_then_noop], n)
            added50 = pct(rpc, 50) - pct(local, 50)
            added99 = pct(rpc, 99) - pct(local, 99)
            row(
                "step",
                f"Step {name} p50 / p99 (RPC vs in-process)",
                f"{ms(pct(rpc, 50))} / {ms(pct(rpc, 99))}",
                f"{ms(pct(local, 50))} / {ms(pct(local, 99))}",
                f"added {ms(added50)} / {ms(added99)}",
            )
            handler = logged_durations(srv, "Step", session.id)[-n:]
            if handler:
                row(
                    "step",
                    f"Step {name}: server-side handler p50 (its rpc log line) vs in-process",
                    ms(pct(handler, 50)),
                    ms(pct(local, 50)),
                    f"handler adds {ms(pct(handler, 50) - pct(local, 50))}; "
                    f"transport {ms(pct(rpc, 50) - pct(handler, 50))}",
                )
            naive = added50 - floor.unary_p50
            row(
                "step",
                f"Step {name}: added minus the back-to-back floor, p50",
                ms(naive),
                f"floor {ms(floor.unary_p50)}",
                f"{100 * naive / floor.unary_p50:.0f} % of floor",
            )
            # The reference that pays the floor as the Step does: after the step's idle time.
            beyond = pct(rpc, 50) - pct(both, 50)
            row(
                "step",
                f"Step {name}: RPC minus (in-process step + no-op call), p50",
                ms(beyond),
                f"{ms(pct(both, 50))} step + no-op",
                f"{100 * beyond / floor.unary_p50:.0f} % of floor",
                "<= 25 % of floor",
                beyond <= 0.25 * floor.unary_p50,
            )
            session.delete()
    channel.close()


def bench_train(srv: ServerHandle, text: str, seconds: float) -> None:
    print("train: Train stream chars/s vs a Trainer.step loop in-process", flush=True)
    big = BIG_TANH
    default = PRESETS["default"].replace(seed=1)
    with Client(srv.address) as client:
        for name, config in (("hidden 512 batch 32 seq 100", big), ("default", default)):
            chars_per_step = config.batch_size * config.seq_length
            trainer = trainer_for(config, text)
            trainer.step()
            t0 = time.perf_counter()
            trainer.step()
            once = time.perf_counter() - t0
            steps = max(5, int(seconds / 2 / once))
            session = client.create_session(
                text, session_id=f"train-{config.hidden_size}", **config_kwargs(config)
            )
            session.train(2).wait()  # warm up the server side
            best_rpc = best_local = 0.0
            for _ in range(3):  # alternate, best of three each: the machine is shared
                t0 = time.perf_counter()
                final = session.train(steps).wait()
                elapsed = time.perf_counter() - t0
                assert final.steps_done == steps, final
                best_rpc = max(best_rpc, steps * chars_per_step / elapsed)
                t0 = time.perf_counter()
                for _ in range(steps):
                    trainer.step()
                best_local = max(best_local, steps * chars_per_step / (time.perf_counter() - t0))
            ratio = best_rpc / best_local
            row(
                "train",
                f"Train {name} chars/s ({steps} steps per call, client wall time)",
                f"{best_rpc:,.0f}",
                f"{best_local:,.0f}",
                f"{100 * ratio:.1f} %",
                ">= 95 %",
                ratio >= 0.95,
            )
            session.delete()


def bench_generate(srv: ServerHandle, text: str, length: int) -> None:
    print("generate: chars/s received by the client vs Trainer.sample in-process", flush=True)
    config = PRESETS["min-char-rnn"].replace(seed=1)
    trainer = trainer_for(config, text)
    for _ in range(20):
        trainer.step()
    with Client(srv.address) as client:
        session = client.create_session(text, session_id="gen", **config_kwargs(config))
        session.train(20).wait()
        prime = text[:20]
        prime_ids = trainer.vocab.encode(prime)
        session.generate(200, prime=prime, seed=1)  # warm up
        best_rpc = best_local = 0.0
        for rep in range(3):
            t0 = time.perf_counter()
            received = sum(len(c) for c in session.generate_stream(length, prime=prime, seed=rep))
            best_rpc = max(best_rpc, received / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            made = sum(len(c) for c in trainer.sample(prime_ids, length, seed=rep))
            best_local = max(best_local, made / (time.perf_counter() - t0))
        ratio = best_rpc / best_local
        row(
            "generate",
            f"Generate hidden 100, {length:,} chars: chars/s received",
            f"{best_rpc:,.0f}",
            f"{best_local:,.0f} in-process",
            f"{100 * ratio:.1f} %",
            ">= 90 %",
            ratio >= 0.90,
        )
        session.delete()


def bench_sessions(srv: ServerHandle, counts: list[int], text: str) -> None:
    print(
        f"sessions: {', '.join(f'{c:,}' for c in counts)} resident sessions, hidden 100", flush=True
    )
    config = PRESETS["min-char-rnn"].replace(seed=1)
    kwargs = config_kwargs(config)
    with Client(srv.address) as client:
        base = srv.rss_bytes()
        row("sessions", "server RSS with no session", f"{base / 2**20:,.0f} MiB")
        probe = client.create_session(text, session_id="probe", **kwargs)
        step_alone = pct(timed(probe.step, 300), 50)
        made = 0
        create: list[float] = []
        for count in counts:
            while made < count:
                t0 = time.perf_counter()
                client.create_session(text, session_id=f"many-{made:06d}", **kwargs)
                create.append(time.perf_counter() - t0)
                made += 1
            rss = srv.rss_bytes()
            per = (rss - base) / count
            ok = rss <= 2 * 2**30 if count >= 10_000 else None
            row(
                "sessions",
                f"server RSS with {count:,} resident sessions",
                f"{rss / 2**20:,.0f} MiB",
                ratio=f"{per / 1024:,.0f} KiB per session",
                target="<= 2 GiB" if count >= 10_000 else "",
                ok=ok,
            )
        recent = create[-min(1000, len(create)) :]
        row(
            "sessions",
            f"CreateSession p50 / p99 (last {len(recent):,}, at {made:,} sessions)",
            f"{ms(pct(recent, 50))} / {ms(pct(recent, 99))}",
        )
        rng = np.random.default_rng(0)
        ids = [f"many-{i:06d}" for i in rng.integers(0, made, size=1000)]
        it = iter(ids)
        get = timed(lambda: client.session(next(it)).info(), len(ids) - 20, warmup=20)
        row(
            "sessions",
            f"GetSession p50 / p99 (at {made:,} sessions)",
            f"{ms(pct(get, 50))} / {ms(pct(get, 99))}",
        )
        step_at_scale = pct(timed(probe.step, 300), 50)
        row(
            "sessions",
            f"Step p50 on one session, with {made:,} others vs alone",
            ms(step_at_scale),
            ms(step_alone),
            f"{100 * step_at_scale / step_alone:.0f} %",
        )
        for page in (100, 1000):
            t0 = time.perf_counter()
            listed = sum(1 for _ in client.list_sessions(page_size=page))
            elapsed = time.perf_counter() - t0
            row(
                "sessions",
                f"ListSessions over all {listed:,} (page_size {page})",
                f"{elapsed * 1000:,.0f} ms",
                ratio=f"{ms(elapsed / max(1, -(-listed // page)))} per page",
            )


def bench_parallel(
    srv: ServerHandle, text: str, seconds: float, counts: list[int], rounds: int = 3
) -> None:
    print("parallel: aggregate chars/s with N sessions training at once", flush=True)
    config = BIG_TANH
    chars_per_step = config.batch_size * config.seq_length
    trainers = [trainer_for(config, text) for _ in range(max(counts))]
    for trainer in trainers:
        trainer.step()
    with Client(srv.address) as client:
        sessions = [
            client.create_session(text, session_id=f"par-{i}", **config_kwargs(config))
            for i in range(max(counts))
        ]
        rates: dict[int, float] = {}
        local: dict[int, float] = {}
        for n in counts:
            rates[n] = local[n] = 0.0
            for _ in range(rounds):  # alternate, best of rounds: the machine is shared
                streams = [s.train(1_000_000) for s in sessions[:n]]
                threads = [
                    threading.Thread(target=drain, args=(st,), daemon=True) for st in streams
                ]
                for t in threads:
                    t.start()
                time.sleep(0.5)  # warm up: every session is training
                before = [s.info().step for s in sessions[:n]]
                t0 = time.perf_counter()
                time.sleep(seconds / rounds)
                after = [s.info().step for s in sessions[:n]]
                elapsed = time.perf_counter() - t0
                for st in streams:
                    st.cancel()
                for t in threads:
                    t.join(30)
                for s in sessions[:n]:
                    wait_idle(s)
                steps = sum(a - b for a, b in zip(after, before, strict=True))
                rates[n] = max(rates[n], steps * chars_per_step / elapsed)
                # The same in this process with plain threads: what the machine allows now.
                local[n] = max(local[n], local_parallel(trainers[:n], seconds / rounds))
            ratio = rates[n] / rates[counts[0]]
            local_ratio = local[n] / local[counts[0]]
            row(
                "parallel",
                f"{n} session(s) training, hidden 512 batch 32 seq 100: aggregate chars/s",
                f"{rates[n]:,.0f}" + (f" ({ratio:.2f}x)" if n != counts[0] else ""),
                f"{local[n]:,.0f} in-process threads"
                + (f" ({local_ratio:.2f}x)" if n != counts[0] else ""),
                f"{100 * rates[n] / local[n]:.0f} % of in-process",
                ">= 1.6x" if n == 2 else "",
                ratio >= 1.6 if n == 2 else None,
            )


class Watchers:
    """n WatchLoss streams on one session, followed by one asyncio loop in a thread here.

    ``received[i][step]`` is when watcher i got that step's point (perf_counter).
    """

    def __init__(self, address: str, session_id: str, n: int) -> None:
        self.received: list[dict[int, float]] = [{} for _ in range(n)]
        self.counts = [0] * n
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._args = (address, session_id, n)
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        self._ready.wait(30)

    async def _run(self) -> None:
        address, session_id, n = self._args
        async with aio.insecure_channel(address) as channel:
            stub = pb_grpc.RnnServiceStub(channel)
            calls = [
                stub.WatchLoss(pb.WatchLossRequest(session_id=session_id, from_step=0))
                for _ in range(n)
            ]

            async def follow(i: int, call: Any) -> None:
                try:
                    async for msg in call:
                        now = time.perf_counter()
                        for point in msg.points:
                            self.received[i][point.step] = now
                        self.counts[i] += len(msg.points)
                except (asyncio.CancelledError, grpc.RpcError):
                    pass

            tasks = [asyncio.create_task(follow(i, c)) for i, c in enumerate(calls)]
            self._ready.set()
            while not self._stop.is_set():
                await asyncio.sleep(0.05)
            for c in calls:
                c.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def wait_for(self, step: int, timeout: float = 30.0) -> None:
        """Until every watcher has received ``step`` points."""
        deadline = time.monotonic() + timeout
        while min(self.counts) < step and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


def step_delays(session: Any, watchers: Watchers, steps: int) -> tuple[list[float], int]:
    """Step at ~20 Hz; seconds from each Step's response to each watcher having its point."""
    sent: dict[int, float] = {}
    for _ in range(steps):
        response = session.step()
        sent[response.step] = time.perf_counter()
        time.sleep(0.05)
    time.sleep(0.5)
    delays = [got[step] - t for step, t in sent.items() for got in watchers.received if step in got]
    return delays, len(sent) * len(watchers.received) - len(delays)


def bench_watch(srv: ServerHandle, text: str, n: int, seconds: float) -> None:
    print(f"watch: {n} WatchLoss streams on one training session", flush=True)
    config = PRESETS["default"].replace(
        cell="rnn", num_layers=1, dropout=0.0, hidden_size=32, seed=1
    )
    with Client(srv.address) as client:
        session = client.create_session(text, session_id="watched", **config_kwargs(config))
        session.train(20).wait()

        def train_rate() -> float:
            before = session.info().step
            t0 = time.perf_counter()
            stream = session.train(1_000_000)
            thread = threading.Thread(target=drain, args=(stream,), daemon=True)
            thread.start()
            time.sleep(seconds)
            stream.cancel()
            thread.join(30)
            wait_idle(session)
            return (session.info().step - before) / (time.perf_counter() - t0)

        alone = train_rate()
        one = Watchers(srv.address, "watched", 1)
        one.wait_for(session.info().step)
        delays_one, _ = step_delays(session, one, int(seconds * 10))
        one.close()

        many = Watchers(srv.address, "watched", n)
        many.wait_for(session.info().step)  # every watcher has the history
        base = sum(many.counts)
        t0 = time.perf_counter()
        watched = train_rate()
        delivered = (sum(many.counts) - base) / (time.perf_counter() - t0)
        row(
            "watch",
            f"training steps/s with {n} watchers (hidden 32)",
            f"{watched:,.0f}",
            f"{alone:,.0f} with none",
            f"{100 * watched / alone:.0f} %",
        )
        row(
            "watch",
            f"loss points/s delivered to {n} watchers",
            f"{delivered:,.0f}",
            f"{n} x {watched:,.0f} steps/s = {n * watched:,.0f}",
            f"{100 * delivered / max(1.0, n * watched):.0f} %",
        )
        delays, missing = step_delays(session, many, int(seconds * 10))
        many.close()
        row(
            "watch",
            f"delay Step response -> watcher has the point, {n} watchers, p50 / p99",
            f"{ms(pct(delays, 50))} / {ms(pct(delays, 99))}",
            f"1 watcher {ms(pct(delays_one, 50))} / {ms(pct(delays_one, 99))}",
            f"added {ms(pct(delays, 50) - pct(delays_one, 50))} p50"
            + (f", {missing} missing" if missing else ""),
        )
        session.delete()


# ---------------------------------------------------------------------------------------------


def print_table(meta: dict[str, str]) -> None:
    print()
    print(f"rnnserve service benchmark  {meta['date']}  CPU: {meta['cpu']} x{meta['cores']}")
    print(f"BLAS threads {BLAS_THREADS} (client and server); load average at start {meta['load']}")
    header = ("row", "what", "rnnserve", "reference", "ratio", "target")
    widths = [8, 66, 22, 30, 26, 20]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in ROWS_OUT:
        target = r.target + ("" if r.ok is None else (" met" if r.ok else " MISSED"))
        cells = (r.section, r.what, r.value, r.reference, r.ratio, target)
        print(" | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (~1 min)")
    parser.add_argument("--seconds", type=float, default=4.0, help="time per throughput cell")
    parser.add_argument("--calls", type=int, default=1000, help="calls per latency cell")
    parser.add_argument("--sessions", type=int, default=10_000, help="most resident sessions")
    parser.add_argument("--watchers", type=int, default=100, help="WatchLoss streams")
    parser.add_argument("--only", default=",".join(ROWS), help=f"rows: {','.join(ROWS)}")
    parser.add_argument(
        "--blas-threads", default="1", help="BLAS threads, client and server (0 = library's)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.calls = 1.0, 200
        args.sessions = min(args.sessions, 1000)
    only = set(args.only.split(","))
    unknown = only - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {','.join(ROWS)}")
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "cores": str(len(os.sched_getaffinity(0))),
        "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    text = load_text()
    started = time.perf_counter()
    # Every core may train (the parallel row measures how sessions scale across cores; the
    # default --max-running-jobs keeps one core for interactive calls: bench/jobs.py).
    with server(max_running_jobs=len(os.sched_getaffinity(0))) as srv:
        floor = bench_floor(srv, args.calls)
        if "step" in only:
            bench_step(srv, floor, text, args.calls)
        if "train" in only:
            bench_train(srv, text, args.seconds)
        if "generate" in only:
            bench_generate(srv, text, 20_000 if args.quick else 100_000)
        if "parallel" in only:
            bench_parallel(srv, text, 1.5 * args.seconds, [1, 2, 4])
        if "watch" in only:
            bench_watch(srv, text, args.watchers, args.seconds)
    if "sessions" in only:
        counts = sorted({min(1000, args.sessions), args.sessions})
        with server(
            max_sessions=args.sessions + 10,
            max_resident_sessions=args.sessions + 10,
            idle_evict_seconds=0,
        ) as srv:
            bench_sessions(srv, counts, text[:1000])
    print_table(meta)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
