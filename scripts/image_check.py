"""Client-side checks that scripts/image.sh runs against a server inside the container image.

    python scripts/image_check.py wait ADDRESS [--timeout S]
    python scripts/image_check.py exercise ADDRESS METRICS_URL SESSION_ID   # prints the step
    python scripts/image_check.py verify ADDRESS SESSION_ID STEP

Everything goes through the public client library (``rnnserve.Client``); metrics are scraped
over HTTP. Exit status 0 when the check passed, 1 with a one-line reason when it did not.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from rnnserve import Client, RnnServeError

TEXT = (
    "Sessions survive restarts: a container stopped with SIGTERM checkpoints what it trained, "
    "and the next one on the same volume carries on from the same step. "
) * 8
TRAIN_STEPS = 40


class CheckFailedError(Exception):
    """A check did not hold; the message says which and what was seen."""


def say(message: str) -> None:
    print(f"[image-check] {message}", file=sys.stderr, flush=True)


def scrape(url: str) -> list[Sample]:
    """Every sample at a Prometheus text endpoint."""
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode("utf-8")
    return [s for family in text_string_to_metric_families(body) for s in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def cmd_wait(args: argparse.Namespace) -> None:
    with Client(args.address, timeout=10) as client:
        client.wait_ready(timeout=args.timeout)
    say(f"{args.address} is SERVING")


def cmd_exercise(args: argparse.Namespace) -> None:
    before = scrape(args.metrics_url)
    with Client(args.address, timeout=60) as client:
        session = client.create_session(
            TEXT, session_id=args.session_id, hidden_size=32, seq_length=16, seed=7
        )
        say(f"created session {session.id!r}")
        progress = list(session.train(TRAIN_STEPS, report_every=10))
        final = progress[-1]
        if final.steps_done != TRAIN_STEPS or final.step != TRAIN_STEPS:
            raise CheckFailedError(f"Train ended at step {final.step} ({final.steps_done} done)")
        say(
            f"trained {final.steps_done} steps over {len(progress)} stream messages: "
            f"loss {final.loss:.3f}, {final.chars_per_second:.0f} chars/s"
        )
        text = session.generate(80, prime="S", seed=1)
        if len(text) != 80:
            raise CheckFailedError(f"Generate returned {len(text)} characters, not 80")
        say(f"generated {text!r}")
        step = session.info().step
    after = scrape(args.metrics_url)
    moved = {
        name: total(after, name) - total(before, name)
        for name in (
            "grpc_server_handled_total",
            "rnnserve_training_updates_total",
            "rnnserve_training_chars_total",
            "rnnserve_checkpoints_total",
        )
    }
    say("metrics moved: " + ", ".join(f"{k} +{v:g}" for k, v in moved.items()))
    if moved["rnnserve_training_updates_total"] != TRAIN_STEPS:
        raise CheckFailedError(
            f"rnnserve_training_updates_total moved by {moved}, not {TRAIN_STEPS}"
        )
    if moved["rnnserve_training_chars_total"] <= 0 or moved["grpc_server_handled_total"] < 3:
        raise CheckFailedError(f"counters did not move: {moved}")
    if (
        total(after, "rnnserve_sessions") < 1
        or total(after, "grpc_server_handled_total", grpc_method="Train") < 1
    ):
        raise CheckFailedError("the session or the Train RPC is missing from /metrics")
    print(step)


def cmd_verify(args: argparse.Namespace) -> None:
    with Client(args.address, timeout=60) as client:
        info = client.session(args.session_id).info()
        if info.step != args.step:
            raise CheckFailedError(
                f"session {args.session_id!r} is at step {info.step}, not {args.step}"
            )
        ids = [s.session_id for s in client.list_sessions()]
        text = client.session(args.session_id).generate(40, prime="S", seed=1)
    say(f"after restart: sessions {ids}, {args.session_id!r} at step {info.step}; {text!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    wait = commands.add_parser("wait")
    wait.add_argument("address")
    wait.add_argument("--timeout", type=float, default=60.0)
    wait.set_defaults(run=cmd_wait)
    exercise = commands.add_parser("exercise")
    exercise.add_argument("address")
    exercise.add_argument("metrics_url")
    exercise.add_argument("session_id")
    exercise.set_defaults(run=cmd_exercise)
    verify = commands.add_parser("verify")
    verify.add_argument("address")
    verify.add_argument("session_id")
    verify.add_argument("step", type=int)
    verify.set_defaults(run=cmd_verify)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (CheckFailedError, RnnServeError, OSError) as exc:
        say(f"FAIL: {type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
