"""Held-out quality after fixed training times, through the service as a user gets it.

Starts a real ``rnnserve-server`` (or uses ``--address``), creates one session per
configuration with the client library (``create_session``: the text over 256 Ki characters
goes through AppendText, as for every user) on the first 90 % of a corpus (tiny Shakespeare by
default), trains it with the Train stream, and at each checkpoint time (``--at 300,1200``
seconds of training, then at each ``--chars 20000000`` characters trained: a figure that does
not depend on the CPU) scores the last 10 % with Predict (from a zero state, in nats per
character; Predict's one wrap-around target is 1 of ~110,000) and samples text at temperature
0.8. Evaluation time is not training time: Train is stopped, Predict runs, Train restarts.

    python bench/quality.py --at 300 --run quality --run "lstm-512:preset=quality,hidden_size=512"

A run is ``NAME[:preset=P,field=value,...]``; NAME alone is a preset. The fields are
``create_session``'s, or a training job's learning-rate schedule and early stopping
(``decay``, ``warmup_steps``, ``min_learning_rate``, ``restore_best``, ``eval_every``): a run
with any of those trains as a job (``start_training``) whose schedule ends at the checkpoint, so
each checkpoint is a fresh session. For a time budget the job's target step is the budget times
the steps per second of a first plain Train (a tenth of the budget, at most 20 s, at the peak
rate), and the job's ``max_seconds`` is the rest of the budget. ``--json PATH`` appends one JSON
object per measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from rnnserve import Client, Session, SessionBusy, TrainStream, pb
from rnnserve_server.testing import temporary_server

INT_FIELDS = {
    "hidden_size",
    "seq_length",
    "batch_size",
    "reset_every",
    "num_layers",
    "seed",
    "warmup_steps",
    "eval_every",
}
FLOAT_FIELDS = {"learning_rate", "clip", "dropout", "validation_fraction", "min_learning_rate"}
JOB_FIELDS = {"decay", "warmup_steps", "min_learning_rate", "restore_best", "eval_every"}
T = TypeVar("T")
PROBE_SECONDS = 20.0  # at most this much plain Train measures the steps/s of a scheduled run


@dataclass(frozen=True)
class Run:
    """One configuration: a name, create_session's arguments, a training job's (or none)."""

    name: str
    create: dict[str, Any]
    job: dict[str, Any]


@dataclass(frozen=True)
class Checkpoint:
    """Where to score: after ``value`` seconds of training, or characters (``unit``)."""

    value: float
    unit: str  # "s" | "chars"

    def __str__(self) -> str:
        return f"{self.value:g} s" if self.unit == "s" else f"{self.value:,.0f} chars"


def parse_run(spec: str) -> Run:
    """``NAME[:preset=P,field=value,...]`` -> the Run."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {"preset": name if not rest else "default"}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key in INT_FIELDS:
            kwargs[key] = int(value)
        elif key in FLOAT_FIELDS:
            kwargs[key] = float(value)
        elif key == "restore_best":
            kwargs[key] = value.lower() in ("1", "true", "yes")
        else:
            kwargs[key] = value
    job = {k: v for k, v in kwargs.items() if k in JOB_FIELDS}
    return Run(name, {k: v for k, v in kwargs.items() if k not in JOB_FIELDS}, job)


def train_for(session: Session, seconds: float) -> tuple[float, int]:
    """Train until ``seconds`` of Train time have passed; (seconds trained, chars/s). A fast
    model can finish a whole Train before that: then another one follows."""
    trained, speed = train_once(session, seconds)
    while trained < seconds - 1:
        more, speed = train_once(session, seconds - trained)
        trained += more
    return trained, speed


def when_free(call: Callable[[], T]) -> T:
    """``call()``, retried while the session is still busy: a Train cancelled before an
    evaluation may still be winding down."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return call()
        except SessionBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def open_train(session: Session, **kwargs: Any) -> tuple[TrainStream, pb.TrainResponse]:
    """A Train stream and its first message."""

    def start() -> tuple[TrainStream, pb.TrainResponse]:
        stream = session.train(**kwargs)
        return stream, next(stream)

    return when_free(start)


def train_to_step(session: Session, step: int) -> tuple[float, int]:
    """Train until the session's step is ``step``; (seconds, chars/s)."""
    stream, last = open_train(session, until_step=step)
    for message in stream:
        last = message
    return last.elapsed_seconds, int(last.chars_per_second)


def train_once(session: Session, seconds: float) -> tuple[float, int]:
    """One Train of up to 10**6 steps, stopped after ``seconds``; (seconds, chars/s)."""
    stream, first = open_train(session, steps=10**6)
    last = first
    if first.elapsed_seconds >= seconds:
        stream.cancel()
        stream.close()
        return first.elapsed_seconds, int(first.chars_per_second)
    for message in stream:
        last = message
        if message.elapsed_seconds >= seconds:
            stream.cancel()
            break
    stream.close()
    return last.elapsed_seconds, int(last.chars_per_second)


def train_scheduled(session: Session, point: Checkpoint, job: dict[str, Any]) -> tuple[float, int]:
    """Train a fresh session as one job whose schedule ends at ``point``; (seconds, chars/s)."""
    c = session.info().config
    if point.unit == "chars":
        target, budget, probed = math.ceil(point.value / (c.seq_length * c.batch_size)), 0.0, 0.0
    else:
        probed, _ = train_for(session, min(PROBE_SECONDS, point.value / 10))
        step = session.info().step
        budget = point.value - probed
        target = step + max(1, round(step / probed * budget))
    job_handle = when_free(
        lambda: session.start_training(until_step=target, max_seconds=budget, **job)
    )
    ended = job_handle.wait()
    if ended.error:
        raise RuntimeError(f"the job failed: {ended.error}")
    return probed + ended.seconds_used, int(ended.chars_per_second)


def measure(
    client: Client,
    run: Run,
    train: str,
    held_out: str,
    points: list[Checkpoint],
    sample_length: int,
) -> Iterator[dict[str, Any]]:
    """Train to each checkpoint, score and sample; yield one row per checkpoint. A run with a
    schedule starts a fresh session for each checkpoint, the others train one on."""
    session: Session | None = None
    trained = 0.0
    for index, point in enumerate(points):
        if session is None or run.job:
            if session is not None:
                session.delete()
            session_id = f"q-{run.name}-{os.getpid()}-{index}"
            session = client.create_session(train, session_id=session_id, **run.create)
            trained = 0.0
        if run.job:
            elapsed, speed = train_scheduled(session, point, run.job)
        elif point.unit == "s":
            elapsed, speed = train_for(session, point.value - trained)
        else:
            c = session.info().config
            step = math.ceil(point.value / (c.seq_length * c.batch_size))
            if session.info().step >= step:
                print(f"{run.name}: already past {point} at the last time; not scored", flush=True)
                continue
            elapsed, speed = train_to_step(session, step)
        trained += elapsed
        yield score(session, run.name, point, trained, speed, train, held_out, sample_length)
    if session is not None:
        session.delete()


def score(
    session: Session,
    name: str,
    point: Checkpoint,
    trained: float,
    speed: int,
    train: str,
    held_out: str,
    sample_length: int,
) -> dict[str, Any]:
    """One row: the session's held-out loss, a sample and its settings."""
    result = session.predict(held_out, timeout=600)
    sample = session.generate(sample_length, prime="\n", temperature=0.8, seed=1)
    info = session.info()
    c = info.config
    return {
        "name": name,
        "checkpoint": str(point),
        "seconds": round(trained),
        "cell": ["?", "rnn", "lstm", "gru"][c.cell] if c.cell else "rnn",
        "layers": c.num_layers or 1,
        "hidden": c.hidden_size,
        "seq": c.seq_length,
        "batch": c.batch_size,
        "optimizer": ["?", "sgd", "adagrad", "adam"][c.optimizer],
        "lr": c.learning_rate,
        "dropout": c.dropout,
        "params": info.parameter_count,
        "steps": info.step,
        "chars": info.step * c.seq_length * c.batch_size,
        "chars_per_s": speed,
        "epochs": info.step * c.seq_length * c.batch_size / len(train),
        "held_out_nats": result.loss,
        "held_out_bits": result.loss / math.log(2),
        "sample": sample,
    }


def checkpoints(at: str, chars: str) -> list[Checkpoint]:
    """The times (ascending), then the character counts (ascending)."""
    times = sorted(float(x) for x in at.split(",") if x.strip())
    counts = sorted(float(x) for x in chars.split(",") if x.strip())
    return [Checkpoint(t, "s") for t in times] + [Checkpoint(n, "chars") for n in counts]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--corpus",
        type=Path,
        required=True,
        help="a UTF-8 text: tiny Shakespeare, or one bench/corpora.py builds",
    )
    parser.add_argument("--at", default="300", help="seconds of training to score at (a,b,..)")
    parser.add_argument(
        "--chars", default="", help="then characters trained to score at (e.g. 20000000)"
    )
    parser.add_argument("--run", action="append", help="NAME[:field=value,...] (repeatable)")
    parser.add_argument("--address", help="use this server instead of starting one")
    parser.add_argument("--blas-threads", type=int, default=1)
    parser.add_argument("--sample-length", type=int, default=400)
    parser.add_argument("--json", type=Path, help="append one JSON object per row to PATH")
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        print(
            f"corpus not found: {args.corpus}; tiny Shakespeare is "
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
            "input.txt, and `python bench/corpora.py --out DIR` builds two more",
            file=sys.stderr,
        )
        return 2
    text = args.corpus.read_text(encoding="utf-8")
    split = int(len(text) * 0.9)
    train, held_out = text[:split], text[split:]
    points = checkpoints(args.at, args.chars)
    runs = [parse_run(r) for r in (args.run or ["min-char-rnn", "default", "quality"])]
    print(
        f"corpus {args.corpus.name}: {len(text):,} chars; train on the first 90 %, Predict on "
        f"the last {len(held_out):,} from a zero state; scored after "
        f"{', '.join(map(str, points))} of training",
        flush=True,
    )
    header = (
        f"{'run':<14} {'cell':>4} {'L':>1} {'hidden':>6} {'seq':>4} {'batch':>5} "
        f"{'lr':>7} {'drop':>4} {'params':>8} | {'s':>5} {'Mchars':>6} {'chars/s':>7} "
        f"{'epochs':>6} {'nats':>6} {'bpc':>6}"
    )
    print(header)
    print("-" * len(header), flush=True)
    with contextlib.ExitStack() as stack:
        address = args.address
        if address is None:
            server = temporary_server(blas_threads=args.blas_threads, idle_evict_seconds=0)
            address = stack.enter_context(server).address
        with Client(address, timeout=120) as client:
            for run in runs:
                for row in measure(client, run, train, held_out, points, args.sample_length):
                    print(
                        f"{run.name:<14} {row['cell']:>4} {row['layers']:>1} {row['hidden']:>6} "
                        f"{row['seq']:>4} {row['batch']:>5} {row['lr']:>7g} "
                        f"{row['dropout']:>4g} {row['params']:>8,} | {row['seconds']:>5} "
                        f"{row['chars'] / 1e6:>6.2f} {row['chars_per_s']:>7,} "
                        f"{row['epochs']:>6.2f} "
                        f"{row['held_out_nats']:>6.3f} {row['held_out_bits']:>6.3f}",
                        flush=True,
                    )
                    print("    sample: " + repr(row["sample"][:160]), flush=True)
                    if args.json is not None:
                        row["job"] = run.job
                        with open(args.json, "a", encoding="utf-8") as out:
                            out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
