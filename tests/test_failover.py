"""Failover as users meet it: a client (library or CLI) going through nginx while the owner
replica is killed or frozen, and calls forwarded between replicas. Real redis-server, nginx and
rnnserve-server replicas, as in test_cluster.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from rnnserve import Client, ConnectionLost, RnnServeError, ServerUnavailable
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve.v1 import rnn_service_pb2_grpc as pb_grpc

from tests.cli_runner import cli_env
from tests.test_cluster import (
    TEXT,
    redis_get,
    start_replicas,
    stream_events,
    wait_until,
)
from tests.test_cluster_consistency import wait_checkpointed

if TYPE_CHECKING:
    from tests.cluster_fixtures import NginxFactory, NginxProcess, RedisProcess
    from tests.conftest import ServerFactory, ServerHandle

pytestmark = pytest.mark.timeout(180)

# No checkpoint during a Train for this long: a kill during the Train always rolls the session
# back to its checkpoint from before the Train, so the rollback is certain, not a race.
NO_CHECKPOINT_DURING_TRAIN = 600


def owner_of(replicas: list[ServerHandle], redis: RedisProcess, session_id: str) -> ServerHandle:
    """The replica holding the session's lease."""
    value = redis_get(redis, f"rnnserve:s:{{{session_id}}}:lease") or ""
    address = value.rsplit("|", 1)[0]
    (owner,) = [r for r in replicas if r.address == address]
    return owner


def checkpointed(redis: RedisProcess, session_id: str) -> int:
    """The step of the session's latest checkpoint in the shared directory (-1: none)."""
    pointer = redis_get(redis, f"rnnserve:s:{{{session_id}}}:ckpt")  # "<token>-<step>.npz"
    return -1 if pointer is None else int(pointer.removesuffix(".npz").split("-")[1])


def published(redis: RedisProcess, session_id: str) -> int:
    """The last step on the session's loss stream (0: none)."""
    steps = [int(e["step"]) for e in stream_events(redis, session_id) if e["kind"] == "loss"]
    return max(steps, default=0)


def restores(redis: RedisProcess, session_id: str) -> list[int]:
    """The steps of the session's announced rollbacks (``restored`` events on its stream)."""
    return [int(e["step"]) for e in stream_events(redis, session_id) if e["kind"] == "restored"]


def behind_nginx(
    server_factory: ServerFactory,
    redis: RedisProcess,
    nginx_factory: NginxFactory,
    shared: Path,
    session_id: str,
) -> tuple[NginxProcess, ServerHandle]:
    """Three replicas that checkpoint a Train only at its end, nginx in front, and a session
    made through nginx, checkpointed at step 1; nginx and the session's owner."""
    replicas = start_replicas(
        server_factory, redis, shared, checkpoint_interval=NO_CHECKPOINT_DURING_TRAIN
    )
    nginx = nginx_factory([r.address for r in replicas])
    with Client(nginx.address, timeout=30) as client:
        # The tanh RNN: the 3000 updates below were sized for it (a GRU takes longer).
        session = client.create_session(
            TEXT, session_id=session_id, cell="rnn", num_layers=1, hidden_size=32, seed=1
        )
        assert session.step().step == 1
        # Step's checkpoint is written behind its reply: wait until the owner says it is
        # done (under load a Train started earlier was killed before it, and rolled back to
        # step 0). Not the pointer: it moves before the writer is done, and a Train begun
        # meanwhile is checkpointed by that same writer.
        wait_checkpointed(session, 1)
    return nginx, owner_of(replicas, redis, session_id)


def test_train_to_through_nginx_survives_kill9_of_the_owner(
    server_factory: ServerFactory,
    redis_server: RedisProcess,
    nginx_factory: NginxFactory,
    tmp_path: Path,
) -> None:
    nginx, owner = behind_nginx(
        server_factory, redis_server, nginx_factory, tmp_path / "shared", "n"
    )
    target = 3000
    killed: list[int] = []
    with Client(nginx.address, timeout=30) as client:
        session = client.session("n")

        def kill_the_owner(message: pb.TrainResponse) -> None:
            # Once watchers saw steps past the checkpoint (step 1): their loss is announced.
            if not killed and published(redis_server, "n") > 1:
                killed.append(message.step)
                owner.kill()

        result = session.train_to(target, report_every=10, on_progress=kill_the_owner)
        assert killed, "the owner was never killed"
        assert result.final is not None
        assert result.final.step == target
        assert result.final.stop_reason == pb.STOP_REASON_COMPLETED
        assert session.info().step == target
    assert result.retries >= 1
    # The rollback the client saw is the one announced on the session's stream: back to the
    # checkpoint from before the Train, from at least the step it saw when the owner died.
    assert restores(redis_server, "n") == [1]
    ((seen, restored),) = result.rollbacks
    assert restored == 1
    assert seen >= killed[0]


def start_cli(address: str, *args: str) -> subprocess.Popen[str]:
    """``python -m rnnserve --address ADDRESS --json ARGS...``, its output piped."""
    return subprocess.Popen(
        [sys.executable, "-m", "rnnserve", "--address", address, "--json", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )


def test_cli_train_until_step_through_nginx_survives_kill9_of_the_owner(
    server_factory: ServerFactory,
    redis_server: RedisProcess,
    nginx_factory: NginxFactory,
    tmp_path: Path,
) -> None:
    nginx, owner = behind_nginx(
        server_factory, redis_server, nginx_factory, tmp_path / "shared", "c"
    )
    target = 3000
    train = start_cli(
        nginx.address, "train", "c", "--until-step", str(target), "--report-every", "10"
    )
    try:
        assert train.stdout is not None
        for line in train.stdout:  # the Train runs on the owner
            assert int(json.loads(line)["step"]) < target
            if published(redis_server, "c") > 1:  # a loss past the checkpoint (step 1)
                break
        owner.kill()
        out, err = train.communicate(timeout=120)
    finally:
        train.kill()
    assert train.returncode == 0, err
    final = json.loads(out.splitlines()[-1])
    assert (int(final["step"]), final["stop_reason"]) == (target, "STOP_REASON_COMPLETED")
    assert f"retrying toward step {target}" in err
    assert restores(redis_server, "c") == [1]
    assert "came back at step 1 (its last checkpoint)" in err, err
    with Client(nginx.address, timeout=30) as client:
        assert client.session("c").info().step == target


def test_train_without_until_step_cut_off_through_nginx_says_how_to_retry(
    server_factory: ServerFactory,
    redis_server: RedisProcess,
    nginx_factory: NginxFactory,
    tmp_path: Path,
) -> None:
    """Without until_step a retry could train twice: the library and the CLI say so, and name
    the step to retry toward, instead of retrying."""
    replicas = start_replicas(server_factory, redis_server, tmp_path / "shared")
    nginx = nginx_factory([r.address for r in replicas])
    with replicas[0].client() as on_owner:  # replica 0 owns both sessions
        for session_id in ("lib", "cli"):
            on_owner.create_session(TEXT, session_id=session_id, hidden_size=32, seed=1)
            assert on_owner.session(session_id).step().step == 1
    steps = 10**6
    train = start_cli(nginx.address, "train", "cli", "--steps", str(steps), "--report-every", "10")
    try:
        with Client(nginx.address, timeout=30) as client:
            stream = client.session("lib").train(steps, report_every=10)
            assert next(stream).step > 1
            assert train.stdout is not None
            assert int(json.loads(train.stdout.readline())["step"]) > 1
            replicas[0].kill()
            with pytest.raises(ConnectionLost) as lost:
                stream.wait()
        _, err = train.communicate(timeout=60)
    finally:
        train.kill()
    assert lost.value.target_step == 1 + steps
    assert "the connection to the replica was lost mid-call" in str(lost.value)
    assert f"retry with until_step={1 + steps}" in str(lost.value)
    assert train.returncode == 5, err
    assert err.splitlines()[-1] == (
        "rnnserve: unavailable: the connection to the replica was lost mid-call; the session "
        f"may have been updated; rerun with --until-step {1 + steps}"
    )


def test_a_call_forwarded_to_a_frozen_owner_fails_over_within_the_lease(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    owner, other = start_replicas(server_factory, redis_server, tmp_path / "shared", count=2)
    with owner.client() as client:
        client.create_session(TEXT, session_id="f", hidden_size=16, seed=1)
        assert client.session("f").step().step == 1
    wait_until(lambda: checkpointed(redis_server, "f") == 1, what="step 1 checkpointed")
    deadline = 30.0  # far above the lease TTL (2 s)
    owner.process.send_signal(signal.SIGSTOP)
    try:
        with other.client(timeout=deadline) as client:
            started = time.monotonic()
            reply = client.session("f").step(until_step=2)  # forwarded to the frozen owner
            took = time.monotonic() - started
    finally:
        owner.process.send_signal(signal.SIGCONT)
    assert reply.step == 2 and not reply.replayed
    # The forward gave up once the owner's lease was gone, not at the caller's deadline.
    assert took < deadline / 2, took
    other.wait_for_log("forward_owner_lost", session_id="f")


def test_x_session_id_naming_another_session_is_only_a_hint(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    replicas = start_replicas(server_factory, redis_server, tmp_path / "shared")
    for replica, session_id in zip(replicas, ("a", "b"), strict=False):
        with replica.client() as client:  # replica 0 owns "a", replica 1 owns "b"
            client.create_session(TEXT, session_id=session_id, hidden_size=16, seed=1)
            assert client.session(session_id).step().step == 1
    # A Step of "a" whose header names "b": on a's owner, on b's owner, on neither.
    for step, replica in enumerate(replicas, start=2):
        with grpc.insecure_channel(replica.address) as channel:
            reply = pb_grpc.RnnServiceStub(channel).Step(
                pb.StepRequest(session_id="a"), timeout=30, metadata=(("x-session-id", "b"),)
            )
        assert reply.step == step
    with replicas[1].client() as client:
        assert client.session("b").info().step == 1  # "b" untouched


def test_errors_of_a_forward_to_a_dead_owner_name_no_address(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    # A long lease: the dead owner still holds it while the calls below are forwarded to it.
    owner, other = start_replicas(
        server_factory, redis_server, tmp_path / "shared", count=2, lease_ttl=60
    )
    with owner.client() as client:
        client.create_session(TEXT, session_id="d", hidden_size=16, seed=1)
        assert client.session("d").step().step == 1
    owner.kill()
    with other.client() as client:
        session = client.session("d")
        errors: list[RnnServeError] = []
        for call in (
            session.step,
            session.info,
            lambda: session.append_text("more text"),
            lambda: session.train(5).wait(),
        ):
            with pytest.raises(ServerUnavailable) as raised:
                call()
            errors.append(raised.value)
    for error in errors:
        cause = error.cause if isinstance(error, ConnectionLost) else error
        assert cause is not None
        for text in (str(error), cause.details, *cause.metadata.values()):
            assert "ipv4" not in text and str(owner.port) not in text, text
        assert "did not answer" in cause.details
        assert (cause.code, cause.reason) == (grpc.StatusCode.UNAVAILABLE, "OWNER_UNAVAILABLE")
        assert cause.retry_delay == 20  # a third of the lease: how often its fate is known


def test_a_paused_owner_that_lost_its_lease_ends_its_train_saying_so(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    old, new = start_replicas(
        server_factory, redis_server, tmp_path / "shared", count=2, checkpoint_interval=0.2
    )
    key = "rnnserve:s:{p}:"
    with old.client() as client:
        client.create_session(TEXT, session_id="p", hidden_size=32, seed=1)
    with grpc.insecure_channel(old.address) as channel:  # the server's own answer, as is
        stream = iter(
            pb_grpc.RnnServiceStub(channel).Train(
                pb.TrainRequest(session_id="p", steps=10**6, report_every=10)
            )
        )
        assert next(stream).step >= 1
        wait_until(lambda: checkpointed(redis_server, "p") > 0, what="a checkpoint of the Train")
        old.process.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: redis_get(redis_server, key + "lease") is None, what="lease expiry")
            with new.client() as other:
                assert other.session("p").step().step >= 1  # activated on `new`
        finally:
            old.process.send_signal(signal.SIGCONT)
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
    error: Any = ended.value
    assert error.code() == grpc.StatusCode.ABORTED, error.details()
    assert "lost the session's lease" in error.details()
    assert "moved to another replica" in error.details()
    assert "could not save" not in error.details()
    # Not a storage failure: the old replica stays SERVING and forwards to the new owner.
    with old.client() as again:
        wait_until(lambda: again.health() == "SERVING", what="old replica SERVING")
        assert again.session("p").info().session_id == "p"
