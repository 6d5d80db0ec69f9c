"""Soak test: SIGKILL the server at random moments during Train, many times, and check nothing
acknowledged is lost.

Runs ``bench/kill_trials.py``'s ``run_kill_trials`` (``tests/test_faults.py`` runs 20 trials;
this runs 100 by default): each trial restarts a real server on the same data directory, checks
that every session loads, is at or past the last step acknowledged as checkpointed, has a
gap-free loss history that extends the previous one bit for bit, and that no checkpoint file is
torn; then trains two sessions (plus a CreateSession racing the kill every third trial) and
kills the server after a random delay drawn from a seeded RNG. Prints one line per trial and a
summary table. Stops at the first violated guarantee (exit status 1).

    python bench/soak_kill.py --trials 100 --seed 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rnnserve_server.testing import ServerHandle, start_server  # noqa: E402

from bench.kill_trials import KILL_SETTINGS, TRAINED, TrialResult, run_kill_trials  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100, help="kill trials (default 100)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill delays")
    parser.add_argument("--data-dir", type=Path, help="keep the data here (default: a temp dir)")
    args = parser.parse_args()

    def start(data_dir: Path) -> ServerHandle:
        return start_server(data_dir, **KILL_SETTINGS)

    def report(r: TrialResult) -> None:
        acked = " ".join(f"{sid}={r.acked.get(sid, 0)}" for sid in TRAINED)
        create = (
            f" create {r.created}: {'acked' if r.create_acked else 'raced'}" if r.created else ""
        )
        print(
            f"trial {r.trial:4d}  kill after {r.delay * 1000:5.1f} ms  acked {acked}  "
            f"temp files {r.temp_files}{create}  ({r.seconds:.2f} s)",
            flush=True,
        )

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rnnserve-soak-") as tmp:
        data_dir = args.data_dir or Path(tmp) / "data"
        try:
            results = run_kill_trials(start, data_dir, args.trials, args.seed, on_trial=report)
        except AssertionError as exc:
            print(f"FAILED after {time.monotonic() - started:.1f} s: {exc}", file=sys.stderr)
            return 1
    elapsed = time.monotonic() - started

    lost = [r.restored[sid] - r.acked[sid] for r in results for sid in TRAINED]
    raced = [r for r in results if r.created]
    rows = [
        ("trials (SIGKILL during Train)", f"{len(results)}"),
        ("sessions checked per restart", f"{len(TRAINED)} trained + created ones"),
        ("restarts with every session READY", f"{len(results)}/{len(results)}"),
        ("restored step < acknowledged step", "0"),
        ("torn checkpoint files", "0"),
        ("history gaps / changed history", "0 / 0"),
        (
            "steps past the ack also saved (median, max)",
            f"{statistics.median(lost):.0f}, {max(lost)}",
        ),
        ("kills that left a temp file", f"{sum(1 for r in results if r.temp_files)}"),
        (
            "CreateSession racing the kill: acked / not",
            f"{sum(r.create_acked for r in raced)} / {sum(not r.create_acked for r in raced)}",
        ),
        (
            "kill delay (ms, min-max)",
            f"{min(r.delay for r in results) * 1000:.0f}-"
            f"{max(r.delay for r in results) * 1000:.0f}",
        ),
        ("wall time", f"{elapsed:.1f} s ({elapsed / len(results):.2f} s a trial)"),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    print(f"{'soak_kill summary'.ljust(width)}  result")
    print(f"{'-' * width}  {'-' * 30}")
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
