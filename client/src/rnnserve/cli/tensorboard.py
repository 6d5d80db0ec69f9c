"""``tensorboard``: sessions as TensorBoard event files (one run directory per session), and with
``--follow`` their live points until Ctrl-C. The writing is :mod:`rnnserve.tensorboard`'s."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from rnnserve.cli.compare import _Followers, _unique
from rnnserve.cli.exit_codes import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, PROG, UsageError
from rnnserve.cli.output import Output
from rnnserve.cli.training import _CtrlC, _on_ctrl_c
from rnnserve.client import Client
from rnnserve.errors import SessionNotFound
from rnnserve.tensorboard import SessionRun, run_directory
from rnnserve.v1 import rnn_service_pb2 as pb

SAMPLE_SEED = 1  # every sample of a run from the same seed: they differ by training alone


class _Tracked:
    """One session being written: its run, and what was last written of its speed and
    samples (so a poll writes only what changed)."""

    def __init__(self, session: Any, run: SessionRun) -> None:
        self.session = session
        self.run = run
        self.speed: float | None = None
        self.sampled_step: int | None = None

    def refresh(self, args: argparse.Namespace, info: pb.Session) -> None:
        """Write the speed if it changed, and a sample if the session moved on enough."""
        if info.HasField("chars_per_second") and info.chars_per_second != self.speed:
            self.speed = info.chars_per_second
            self.run.add_speed(info.step, info.chars_per_second)
        due = self.sampled_step is None or info.step - self.sampled_step >= args.sample_every
        if args.sample_length and info.state != pb.SESSION_STATE_BROKEN and due:
            self.sampled_step = info.step
            text = self.session.generate(
                args.sample_length,
                args.sample_prime,
                args.sample_temperature,
                seed=SAMPLE_SEED,
            )
            self.run.add_sample(info.step, args.sample_prime + text)
        self.run.flush()


def cmd_tensorboard(client: Client, args: argparse.Namespace, out: Output) -> int:
    logdir = Path(args.logdir)
    ids = _unique(args.ids)
    for session_id in ids:
        try:
            run_directory(logdir, session_id)
        except ValueError as e:
            raise UsageError(str(e)) from None
    sessions = {session_id: client.session(session_id) for session_id in ids}
    infos = {session_id: s.info() for session_id, s in sessions.items()}  # all exist
    tracked: dict[str, _Tracked] = {}
    try:
        for session_id in ids:
            tracked[session_id] = _Tracked(sessions[session_id], SessionRun(logdir, session_id))
    except ImportError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    ctrl_c = _CtrlC()
    # Ctrl-C stops between two calls, never inside one (see _on_ctrl_c).
    with _on_ctrl_c(ctrl_c.press):
        try:
            for session_id, t in tracked.items():
                if ctrl_c.pressed:
                    break
                t.run.hyperparameters(infos[session_id])
                t.run.add_points(sessions[session_id].loss_history(1))
                t.refresh(args, infos[session_id])
            _report(tracked, out)
            if args.follow and not ctrl_c.pressed:
                print(
                    f"{PROG}: following {', '.join(ids)} into {logdir} (Ctrl-C stops)",
                    file=sys.stderr,
                    flush=True,
                )
                _follow(tracked, args, ctrl_c)
                _report(tracked, out)  # Ctrl-C, or every stream ended (deleted, server left)
        finally:
            for t in tracked.values():
                t.run.close()
    return EXIT_INTERRUPTED if ctrl_c.pressed else EXIT_OK


def _follow(tracked: dict[str, _Tracked], args: argparse.Namespace, ctrl_c: _CtrlC) -> None:
    """Append each session's live points; every ``--interval`` seconds, its speed and (every
    ``--sample-every`` steps) a sample. Returns on Ctrl-C or when every stream has ended."""
    streams = {
        session_id: t.session.watch_loss(t.run.step + 1) for session_id, t in tracked.items()
    }
    followers = _Followers(streams, None, ctrl_c)
    poll_at = time.monotonic() + args.interval
    try:
        while not followers.finished() and not ctrl_c.pressed:
            for session_id, points in followers.wait(max(0.0, poll_at - time.monotonic())).items():
                if points:
                    tracked[session_id].run.add_points(points)
            if time.monotonic() >= poll_at and not ctrl_c.pressed:
                poll_at = time.monotonic() + args.interval
                for t in tracked.values():
                    try:
                        info = t.session.info()
                    except SessionNotFound:  # deleted: its stream ends, the others go on
                        continue
                    t.refresh(args, info)
    finally:
        followers.cancel()


def _report(tracked: dict[str, _Tracked], out: Output) -> None:
    for session_id, t in tracked.items():
        where = str(t.run.directory)
        out.obj(
            {"session_id": session_id, "run": where, "points": t.run.points, "step": t.run.step}
        )
        out.line(f"{session_id}: {t.run.points:,} points up to step {t.run.step} in {where}")
