"""How long cluster mode is unavailable when Redis restarts: a real redis-server (append-only
file on) and two real rnnserve-server replicas on loopback ports sharing one directory.

Three clients Step in a loop (2 s deadline per call) all through the restart: on a session
via its owner, on another session of the same owner via the other replica (forwarded), and
in turn on 40 sessions no replica holds at the start (the first call of each activates it: a
lease and a load, which need Redis; after an outage past the lease TTL, every one again).
Redis is stopped (SIGTERM: it writes its append-only file), kept down for ``--down`` seconds
(0: a plain restart), and started again on the same port and data. ``--freeze`` instead
stops it with SIGSTOP for ``--down`` seconds and resumes it with SIGCONT: connections hang,
nothing is refused (a Redis that stalls).

Prints a table: per path, the Steps that failed (and their status codes), how long after
Redis answered again the first Step succeeded after the path's last failure (the
unavailability beyond Redis's own downtime), and the acknowledged Steps lost (Steps
acknowledged minus the session's step count at the end); when both replicas reported SERVING
again; and whether the fencing tokens only increased. ``--json`` prints the raw numbers.
Run: ``python bench/redis_restart.py`` (``--down``, ``--freeze``, ``--lease-ttl``, ``--json``).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the bench package, whichever directory this runs from

import redis as redis_lib  # noqa: E402
from rnnserve import Client, RnnServeError  # noqa: E402
from rnnserve_server.testing import start_redis  # noqa: E402

from bench._common import TEXT, start_replica  # noqa: E402


@dataclass
class Loop:
    """One client's Step loop and what it saw (times relative to the Redis stop)."""

    name: str
    address: str
    ids: list[str]
    ok: dict[str, int] = field(default_factory=dict)
    results: list[tuple[float, bool, str]] = field(default_factory=list)


def stepper(path: Loop, t0: list[float], stop: threading.Event) -> None:
    with Client(path.address, timeout=2.0) as client:
        i = 0
        while not stop.is_set():
            session_id = path.ids[i % len(path.ids)]
            i += 1
            try:
                client.session(session_id).step()
                path.ok[session_id] = path.ok.get(session_id, 0) + 1
                path.results.append((time.monotonic() - t0[0], True, ""))
            except RnnServeError as exc:
                path.results.append((time.monotonic() - t0[0], False, exc.code_name))
                stop.wait(0.01)


def run(root: Path, down: float, lease_ttl: float, freeze: bool = False) -> dict[str, object]:
    redis = start_redis(root / "redis")
    shared = root / "shared"
    replicas = [start_replica(root / f"r{i}", redis.url, shared, lease_ttl) for i in range(2)]
    cold_ids = [f"cold{i}" for i in range(40)]
    try:
        with Client(replicas[0].address) as owner:
            for session_id in ("own", "fwd"):
                owner.create_session(TEXT, session_id=session_id, hidden_size=32, seed=1)
        # Sessions no one holds: created on a replica that then drains (releases them).
        creator = start_replica(root / "creator", redis.url, shared, lease_ttl)
        with Client(creator.address) as client:
            for session_id in cold_ids:
                client.create_session(TEXT, session_id=session_id, hidden_size=8, seed=1)
        creator.stop()
        paths = [
            Loop("via the owner", replicas[0].address, ["own"]),
            Loop("via a non-owner (forwarded)", replicas[1].address, ["fwd"]),
            Loop("activating idle sessions", replicas[1].address, cold_ids),
        ]
        t0 = [time.monotonic()]
        stop = threading.Event()
        threads = [threading.Thread(target=stepper, args=(p, t0, stop)) for p in paths]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # a second of normal service before the stop (a benchmark, not a test)
        before = redis_lib.Redis.from_url(redis.url, decode_responses=True)
        tokens_before = {s: int(before.get(f"rnnserve:s:{{{s}}}:token") or 0) for s in ("own",)}
        before.close()
        t0[0] = time.monotonic()
        for p in paths:
            p.results.clear()
        assert redis.process is not None
        if freeze:
            redis.process.send_signal(signal.SIGSTOP)
        else:
            redis.stop()
        stopped = time.monotonic() - t0[0]
        if down > 0:
            time.sleep(down)
        if freeze:
            redis.process.send_signal(signal.SIGCONT)
        else:
            redis.start()
        ready = time.monotonic() - t0[0]
        clients = [Client(r.address, timeout=2) for r in replicas]
        serving_at: list[float] = []
        for client in clients:
            while client.health() != "SERVING":
                time.sleep(0.01)
            serving_at.append(time.monotonic() - t0[0])
            client.close()

        def recovered(p: Loop) -> bool:
            after = [ok for t, ok, _ in p.results if t > ready]
            return len(after) >= 10 and all(after[-10:])

        deadline = time.monotonic() + 60
        while not all(recovered(p) for p in paths) and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join(30)
        out: dict[str, object] = {
            "down_s": down,
            "freeze": freeze,
            "lease_ttl_s": lease_ttl,
            "redis_stopped_s": stopped,
            "redis_ready_s": ready,
            "serving_again_s": serving_at,
        }
        with Client(replicas[1].address, timeout=10) as client:
            kept = True
            for p in paths:
                failures = [t for t, ok, _ in p.results if not ok]
                codes = sorted({c for _, ok, c in p.results if not ok})
                first_ok_after = min((t for t, ok, _ in p.results if ok and t > ready), default=-1)
                last_fail = max(failures, default=0.0)
                first_ok = min((t for t, ok, _ in p.results if ok and t > last_fail), default=-1.0)
                lost = 0
                for session_id, count in p.ok.items():
                    step = client.session(session_id).info().step
                    lost += count - step  # every Step of these sessions came from this path
                kept &= lost == 0
                out[p.name] = {
                    "failed_steps": len(failures),
                    "first_failure_s": min(failures, default=None),
                    "last_failure_s": max(failures, default=None),
                    "codes": codes,
                    "first_success_after_ready_s": first_ok_after,
                    "unavailable_beyond_redis_s": max(0.0, first_ok - ready) if failures else 0.0,
                    "acknowledged_steps_lost": lost,
                }
            out["acknowledged_steps_kept"] = kept
            check = redis_lib.Redis.from_url(redis.url, decode_responses=True)
            out["tokens_increase"] = all(
                int(check.get(f"rnnserve:s:{{{s}}}:token") or 0) >= t
                for s, t in tokens_before.items()
            )
            check.close()
        return out
    finally:
        for replica in replicas:
            replica.stop()
        redis.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--down", type=float, default=0.0, help="seconds Redis stays down")
    parser.add_argument(
        "--freeze", action="store_true", help="SIGSTOP Redis for --down seconds instead"
    )
    parser.add_argument("--lease-ttl", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rnnserve-bench-redis-") as tmp:
        result = run(Path(tmp), args.down, args.lease_ttl, args.freeze)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"Redis {'frozen' if args.freeze else 'stopped'}, down {args.down:g} s, "
        f"answering again at {result['redis_ready_s']:.3f} s "
        f"(lease TTL {args.lease_ttl:g} s); replicas SERVING again at "
        + ", ".join(f"{t:.2f} s" for t in result["serving_again_s"])  # type: ignore[attr-defined]
    )
    print(
        "| path | failed Steps | first failure | codes | unavailable beyond Redis "
        "| acknowledged Steps lost |"
    )
    print("|---|---|---|---|---|---|")
    for name in ("via the owner", "via a non-owner (forwarded)", "activating idle sessions"):
        row = result[name]
        assert isinstance(row, dict)
        codes = ", ".join(row["codes"]) or "-"
        beyond = row["unavailable_beyond_redis_s"]
        first = row["first_failure_s"]
        first_text = "-" if first is None else f"{first:.2f} s"
        print(
            f"| {name} | {row['failed_steps']} | {first_text} | {codes} | {beyond:.2f} s "
            f"| {row['acknowledged_steps_lost']} |"
        )
    print(f"fencing tokens only increased: {result['tokens_increase']}")


if __name__ == "__main__":
    main()
