"""Held-out quality after fixed training times, through the service as a user gets it.

Starts a real ``rnnserve-server`` (or uses ``--address``), creates one session per
configuration with the client library (``create_session``: the text over 256 Ki characters
goes through AppendText, as for every user) on the first 90 % of a corpus (tiny Shakespeare by
default), trains it with the Train stream, and at each checkpoint time (``--at 300,1200``
seconds of training) scores the last 10 % with Predict (from a zero state, in nats per
character; Predict's one wrap-around target is 1 of ~110,000) and samples text at temperature
0.8. Evaluation time is not training time: Train is stopped, Predict runs, Train restarts.

    python bench/quality.py --at 300 --run quality --run "lstm-512:preset=quality,hidden_size=512"

A run is ``NAME[:preset=P,field=value,...]``; NAME alone is a preset. ``--json PATH`` appends
one JSON object per measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rnnserve import Client, Session, SessionBusy
from rnnserve_server.testing import temporary_server

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
INT_FIELDS = {"hidden_size", "seq_length", "batch_size", "reset_every", "num_layers", "seed"}
FLOAT_FIELDS = {"learning_rate", "clip", "dropout"}


def parse_run(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME[:preset=P,field=value,...]`` -> (name, create_session keyword arguments)."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {"preset": name if not rest else "default"}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key in INT_FIELDS:
            kwargs[key] = int(value)
        elif key in FLOAT_FIELDS:
            kwargs[key] = float(value)
        else:
            kwargs[key] = value
    return name, kwargs


def train_for(session: Session, seconds: float) -> tuple[float, int]:
    """Train until ``seconds`` of Train time have passed; (seconds trained, chars/s). A fast
    model can finish a whole Train before that: then another one follows."""
    trained, speed = train_once(session, seconds)
    while trained < seconds - 1:
        more, speed = train_once(session, seconds - trained)
        trained += more
    return trained, speed


def train_once(session: Session, seconds: float) -> tuple[float, int]:
    """One Train of up to 10**6 steps, stopped after ``seconds``; (seconds, chars/s)."""
    deadline = time.monotonic() + 60
    while True:  # the Train cancelled before an evaluation may still be winding down
        try:
            stream = session.train(10**6)
            first = next(stream)
            break
        except SessionBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
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


def measure(
    client: Client,
    name: str,
    kwargs: dict[str, Any],
    train: str,
    held_out: str,
    at: list[float],
    sample_length: int,
) -> Iterator[dict[str, Any]]:
    """Create, train to each time in ``at``, score and sample; yield one row per time."""
    session = client.create_session(train, session_id=f"q-{name}-{os.getpid()}", **kwargs)
    info = session.info()
    trained = 0.0
    for target in at:
        elapsed, speed = train_for(session, target - trained)
        trained += elapsed
        result = session.predict(held_out, timeout=600)
        sample = session.generate(sample_length, prime="\n", temperature=0.8, seed=1)
        c = session.info().config
        yield {
            "name": name,
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
            "steps": session.info().step,
            "chars_per_s": speed,
            "epochs": session.info().step * c.seq_length * c.batch_size / len(train),
            "held_out_nats": result.loss,
            "held_out_bits": result.loss / math.log(2),
            "sample": sample,
        }
    session.delete()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--at", default="300", help="seconds of training to score at (a,b,..)")
    parser.add_argument("--run", action="append", help="NAME[:field=value,...] (repeatable)")
    parser.add_argument("--address", help="use this server instead of starting one")
    parser.add_argument("--blas-threads", type=int, default=1)
    parser.add_argument("--sample-length", type=int, default=400)
    parser.add_argument("--json", type=Path, help="append one JSON object per row to PATH")
    args = parser.parse_args(argv)
    if not args.corpus.is_file():
        print(
            f"corpus not found: {args.corpus}; give one with --corpus PATH (tiny Shakespeare: "
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/"
            "input.txt)",
            file=sys.stderr,
        )
        return 2
    text = args.corpus.read_text(encoding="utf-8")
    split = int(len(text) * 0.9)
    train, held_out = text[:split], text[split:]
    at = sorted(float(x) for x in args.at.split(","))
    runs = [parse_run(r) for r in (args.run or ["min-char-rnn", "default", "quality"])]
    print(
        f"corpus {args.corpus.name}: {len(text):,} chars; train on the first 90 %, Predict on "
        f"the last {len(held_out):,} from a zero state; scored after {args.at} s of training",
        flush=True,
    )
    header = (
        f"{'run':<14} {'cell':>4} {'L':>1} {'hidden':>6} {'seq':>4} {'batch':>5} "
        f"{'lr':>7} {'drop':>4} {'params':>8} | {'s':>5} {'chars/s':>7} {'epochs':>6} "
        f"{'nats':>6} {'bpc':>6}"
    )
    print(header)
    print("-" * len(header), flush=True)
    with contextlib.ExitStack() as stack:
        address = args.address
        if address is None:
            server = temporary_server(blas_threads=args.blas_threads, idle_evict_seconds=0)
            address = stack.enter_context(server).address
        with Client(address, timeout=120) as client:
            for name, kwargs in runs:
                for row in measure(client, name, kwargs, train, held_out, at, args.sample_length):
                    print(
                        f"{name:<14} {row['cell']:>4} {row['layers']:>1} {row['hidden']:>6} "
                        f"{row['seq']:>4} {row['batch']:>5} {row['lr']:>7g} "
                        f"{row['dropout']:>4g} {row['params']:>8,} | {row['seconds']:>5} "
                        f"{row['chars_per_s']:>7,} {row['epochs']:>6.2f} "
                        f"{row['held_out_nats']:>6.3f} {row['held_out_bits']:>6.3f}",
                        flush=True,
                    )
                    print("    sample: " + repr(row["sample"][:160]), flush=True)
                    if args.json is not None:
                        with open(args.json, "a", encoding="utf-8") as out:
                            out.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
