"""Training jobs on one server: 4 jobs share the --max-running-jobs slots fairly, and an idle
session's Step stays quick beside them.

A real ``rnnserve-server`` subprocess with its defaults (``--max-running-jobs``: the cores
minus one) and the default model. Measured:

- fairness: each of 4 jobs' chars/s over the same window (target: every job within +-15 % of
  their mean; every job progresses);
- latency: an idle session's Step p50/p99 alone, then beside the 4 running jobs (target: p99
  beside them <= 3x alone).

Run: ``python bench/jobs.py`` (about a minute), ``--seconds`` for the fairness window.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the bench package, whichever directory this runs from

# First: it sets the BLAS threads before numpy is imported.
from bench._blas import BLAS_THREADS  # noqa: E402

# isort: split
from rnnserve import Client  # noqa: E402
from rnnserve_server.testing import temporary_server  # noqa: E402

from bench._common import cpu_name, load_text  # noqa: E402

JOBS = 4


def step_times(client: Client, session_id: str, n: int) -> list[float]:
    session = client.session(session_id)
    for _ in range(20):  # warm-up
        session.step()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        session.step()
        out.append(time.perf_counter() - t0)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="fairness window")
    parser.add_argument("--steps", type=int, default=300, help="Steps per latency cell")
    args = parser.parse_args(argv)
    text = load_text(100_000)
    with (
        temporary_server(blas_threads=BLAS_THREADS, log_level="warning") as srv,
        srv.client() as client,
    ):
        idle = client.create_session(text, session_id="idle")
        alone = step_times(client, idle.id, args.steps)
        sessions = [client.create_session(text, session_id=f"job{i}") for i in range(JOBS)]
        per_step = {s.id: s.info().config.batch_size * s.info().config.seq_length for s in sessions}
        jobs = [s.start_training(1_000_000) for s in sessions]
        for job in jobs:  # every job has trained a first chunk
            with job.follow() as stream:
                next(iter(stream), None)
        start = {j.name: j.refresh().step for j in jobs}
        t0 = time.monotonic()
        beside = step_times(client, idle.id, args.steps)
        remaining = args.seconds - (time.monotonic() - t0)
        if remaining > 0:
            time.sleep(remaining)  # the fairness window (a measurement, not a synchronisation)
        elapsed = time.monotonic() - t0
        rates = {}
        for job, session in zip(jobs, sessions, strict=True):
            done = job.refresh().step - start[job.name]
            rates[job.name] = done * per_step[session.id] / elapsed
        for job in jobs:
            job.stop()
    mean = statistics.fmean(rates.values())
    spread = max(abs(r - mean) / mean for r in rates.values()) if mean else float("inf")
    ratio = pct(beside, 99) / pct(alone, 99)
    print(f"rnnserve jobs benchmark  {time.strftime('%Y-%m-%d')}  CPU: {cpu_name()}")
    print(f"cores {len(os.sched_getaffinity(0))}; load average at end {os.getloadavg()[0]:.1f}")
    print("| what | value | target |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name.split('/', 1)[1]} chars/s | {rate:,.0f} ({(rate - mean) / mean:+.1%}) | |")
    print(f"| spread of the 4 jobs' chars/s around their mean | {spread:.1%} | <= 15 % |")
    print(
        f"| idle session Step p50 / p99 alone | {pct(alone, 50) * 1e3:.1f} / "
        f"{pct(alone, 99) * 1e3:.1f} ms | |"
    )
    print(
        f"| idle session Step p50 / p99 beside 4 jobs | {pct(beside, 50) * 1e3:.1f} / "
        f"{pct(beside, 99) * 1e3:.1f} ms | |"
    )
    print(f"| Step p99 beside / alone | {ratio:.2f}x | <= 3x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
