"""What checkpointing costs a tight Step loop on a session with a large corpus.

A real ``rnnserve-server`` subprocess (``--log-level debug``, so every checkpoint write logs
``checkpoint_written`` with its step, size and time) and this process as the client. For each
model (hidden 32 and the default preset) on the first ``--chars`` characters of tiny Shakespeare
(1M by default): Step called back to back for ``--seconds``, then GetSession polled until
``checkpointed_step`` reaches the last step. Prints Step p50 / p99, steps/s, checkpoint writes/s
during the loop, the size and write time of one checkpoint, and how long after the last Step's
response it was on disk.

    python bench/step_checkpoint.py [--chars 1000000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the bench package, whichever directory this runs from

from rnnserve import Client  # noqa: E402
from rnnserve_server.engine.model_config import PRESETS  # noqa: E402
from rnnserve_server.testing import ServerHandle, temporary_server  # noqa: E402

from bench._common import config_kwargs, load_text  # noqa: E402


def checkpoints(srv: ServerHandle, session_id: str, after_step: int) -> list[dict[str, Any]]:
    """The session's ``checkpoint_written`` log entries for steps past ``after_step``."""
    return [
        entry
        for entry in srv.logs
        if entry.get("event") == "checkpoint_written"
        and entry.get("session_id") == session_id
        and int(entry["step"]) > after_step
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=1_000_000, help="corpus characters")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each Step loop")
    args = parser.parse_args()
    text = load_text(args.chars)
    print(f"corpus: {len(text):,} characters; {args.seconds:g} s of back-to-back Steps per model")
    with temporary_server(log_level="debug") as srv, Client(srv.address, timeout=60) as client:
        models = (
            (
                "hidden 32",
                PRESETS["default"].replace(
                    cell="rnn", num_layers=1, dropout=0.0, hidden_size=32, seed=1
                ),
            ),
            ("default", PRESETS["default"].replace(seed=1)),
        )
        for name, config in models:
            session = client.create_session(
                text, session_id=f"ckpt-{config.hidden_size}", **config_kwargs(config)
            )
            for _ in range(20):  # warm up
                session.step()
            first = session.info().step
            times = []
            began = time.perf_counter()
            while time.perf_counter() - began < args.seconds:
                t0 = time.perf_counter()
                last = session.step().step
                times.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - began
            answered = time.perf_counter()
            deadline = answered + 60
            while session.info().checkpointed_step < last:
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"step {last} was not checkpointed within 60 s")
            durable = time.perf_counter() - answered
            written = [e for e in checkpoints(srv, session.id, first) if e["step"] <= last]
            times.sort()
            p50 = times[len(times) // 2]
            p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
            print(
                f"{name:10s} Step p50 {p50 * 1000:.2f} ms  p99 {p99 * 1000:.2f} ms  "
                f"{len(times) / elapsed:,.0f} steps/s  "
                f"{len(written) / elapsed:,.1f} checkpoints/s"
            )
            if written:
                size = statistics.median(int(e["bytes"]) for e in written)
                ms = statistics.median(float(e["ms"]) for e in written)
                print(
                    f"{'':10s} one checkpoint: {size / 1024:,.0f} KiB, write "
                    f"{ms:.2f} ms p50; last Step durable {durable * 1000:.1f} ms after "
                    "its response"
                )
            session.delete()
    return 0


if __name__ == "__main__":
    sys.exit(main())
