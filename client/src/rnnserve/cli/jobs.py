"""``train --detach``, ``attach``, ``stop`` and ``jobs``: training jobs the server owns (they
go on when the command ends; docs/training-jobs.md)."""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable

from rnnserve._jobs import ENDED, Job, JobStream
from rnnserve.cli.exit_codes import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, PROG, UsageError
from rnnserve.cli.output import Output, _enum_name
from rnnserve.cli.training import _progress_line, cmd_train
from rnnserve.client import Client, Session
from rnnserve.v1 import rnn_service_pb2 as pb

# train's flags only a detached job takes (a streaming Train has no such fields).
JOB_ONLY_FLAGS = ("warmup_steps", "decay", "min_learning_rate", "restore_best")


def job_state(job: pb.Job) -> str:
    return _enum_name(pb.JobState, job.state, "JOB_STATE_")


def job_progress(job: pb.Job) -> str:
    """ "step 1200/5000 24% eta 1m05s" for a job."""
    span = max(job.target_step - job.start_step, 1)
    text = f"step {job.step}/{job.target_step} {100 * job.steps_done // span}%"
    if job.HasField("eta_seconds"):
        text += f" eta {datetime.timedelta(seconds=round(job.eta_seconds))}"
    return text


def job_line(job: pb.Job) -> str:
    """One line saying where a job is, or how it ended."""
    text = f"{job.name}: {job_state(job)}  {job_progress(job)}  loss {job.smoothed_loss:.4f}"
    if job.state in ENDED:
        text += f"  [{_enum_name(pb.StopReason, job.stop_reason, 'STOP_REASON_')}]"
    if job.error:
        text += f"  ({job.error})"
    return text


def start_detached(session: Session, args: argparse.Namespace, out: Output) -> int:
    """train --detach: start a job, print its name, leave it running."""
    job = session.start_training(
        args.steps if args.until_step is None else 0,
        args.report_every,
        args.sample_length,
        until_step=args.until_step,
        until_loss=args.until_loss,
        patience=args.patience,
        eval_every=args.eval_every,
        sample_temperature=args.sample_temperature,
        sample_prime=args.sample_prime,
        max_seconds=args.max_seconds or 0.0,
        warmup_steps=args.warmup_steps,
        decay=args.decay,
        min_learning_rate=args.min_learning_rate,
        restore_best=args.restore_best,
    )
    out.obj(job.info)
    out.line(job.name)
    return EXIT_OK


def check_job_flags(args: argparse.Namespace) -> None:
    """UsageError for a job-only flag without --detach."""
    if args.detach:
        return
    given = [f for f in JOB_ONLY_FLAGS if getattr(args, f) not in (None, False, 0, "")]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise UsageError(f"{flag} is for a training job: add --detach (then `{PROG} attach`)")


def _find(client: Client, args: argparse.Namespace) -> Job:
    return client.session(args.id).job(args.job or "")


def cmd_train_or_start(client: Client, args: argparse.Namespace, out: Output) -> int:
    """train: a streaming Train, or with --detach a job that goes on without this command."""
    check_job_flags(args)
    if args.detach:
        return start_detached(client.session(args.id), args, out)
    return cmd_train(client, args, out)


def cmd_attach(client: Client, args: argparse.Namespace, out: Output) -> int:
    job = _find(client, args)
    stream = job.follow()
    said = Said()
    try:
        for progress in stream:
            said.news(stream)
            out.obj(progress)
            if progress.stop_reason == pb.STOP_REASON_UNSPECIFIED:
                out.line(_progress_line(progress))
            if progress.sample and not out.json:
                out.line(f"--- sample at step {progress.step} ---\n{progress.sample}")
    except KeyboardInterrupt:
        stream.cancel()
        print(
            f"{PROG}: detached; {job.name} goes on (`{PROG} stop {args.id}` stops it, "
            f"`{PROG} attach {args.id}` follows it again)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    ended = stream.job if stream.job.state in ENDED else job.refresh()
    out.obj(ended)
    out.line(job_line(ended))
    return EXIT_ERROR if ended.state == pb.JOB_STATE_FAILED else EXIT_OK


class Said:
    """What ``attach`` told stderr about its watch: that it reconnected (once) and each
    rollback of the job."""

    def __init__(self) -> None:
        self.reconnected = False
        self.rollbacks = 0

    def news(self, stream: JobStream) -> None:
        if stream.reconnects and not self.reconnected:
            self.reconnected = True
            print(
                f"{PROG}: the connection was lost; reconnected, following the job", file=sys.stderr
            )
        for step in stream.rollbacks[self.rollbacks :]:
            print(
                f"{PROG}: the job went back to step {step} (it resumed from its last "
                "checkpoint): the steps after it are trained again",
                file=sys.stderr,
            )
        self.rollbacks = len(stream.rollbacks)


def cmd_stop(client: Client, args: argparse.Namespace, out: Output) -> int:
    job = _find(client, args)
    if not args.job and job.ended:
        print(f"{PROG}: session {args.id!r} runs no job; the last was {job.name}", file=sys.stderr)
        out.obj(job.info)
        return EXIT_OK
    stopped = job.stop()
    out.obj(stopped)
    out.line(job_line(stopped))
    return EXIT_OK


def cmd_jobs(client: Client, args: argparse.Namespace, out: Output) -> int:
    jobs = client.session(args.id).jobs()
    if not jobs:
        out.line(f"session {args.id!r} has no training jobs (start one: {PROG} train ID --detach)")
        return EXIT_OK
    rows = []
    for job in jobs:
        info = job.info
        out.obj(info)
        created = info.create_time.ToDatetime(tzinfo=datetime.UTC).astimezone()
        reason = _enum_name(pb.StopReason, info.stop_reason, "STOP_REASON_")
        rows.append(
            [
                info.job_id,
                job_state(info),
                reason if info.state in ENDED else "-",
                job_progress(info),
                f"{info.smoothed_loss:.4f}",
                f"{info.chars_per_second:,.0f}",
                created.strftime("%Y-%m-%d %H:%M"),
                info.started_by or "-",
            ]
        )
    header = ["JOB", "STATE", "REASON", "PROGRESS", "LOSS", "CHARS/S", "CREATED", "BY"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        out.line("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return EXIT_OK


def add_job_commands(make: Callable[..., argparse.ArgumentParser]) -> None:
    """The attach, stop and jobs subcommands (``make`` is build_parser's ``command``)."""
    for name, func, help, example in (
        (
            "attach",
            cmd_attach,
            "follow a training job's progress and samples until it ends, reconnecting if "
            "the connection is lost; Ctrl-C detaches (the job goes on)",
            "  rnnserve attach shakespeare\n",
        ),
        (
            "stop",
            cmd_stop,
            "stop a training job (default: the session's running job); it is checkpointed",
            "  rnnserve stop shakespeare\n  rnnserve stop shakespeare 3f2a9c0d1e4b\n",
        ),
    ):
        p = make(name, func, help, example)
        p.add_argument("id", metavar="ID")
        p.add_argument(
            "job", nargs="?", metavar="JOB", help="the job's id or name (default: the running one)"
        )
    p = make(
        "jobs", cmd_jobs, "list a session's training jobs, newest first", "  rnnserve jobs hallo\n"
    )
    p.add_argument("id", metavar="ID")
