"""Retrying Step and Train is safe: ``until_step`` names the step a call trains to, so a
retry (a lost reply, a replica's failover) never applies an update twice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import pytest
from rnnserve import Client, InvalidArgument, RnnServeError
from rnnserve.v1 import rnn_service_pb2 as pb

from tests.cli_runner import rnnserve

if TYPE_CHECKING:
    from tests.conftest import ServerHandle

pytestmark = pytest.mark.timeout(90)

TEXT = "The quick brown fox jumps over the lazy dog. " * 20
MODULE_SERVER_SETTINGS = {"max_train_steps": 500}


@pytest.fixture
def client(module_server: ServerHandle) -> Iterator[Client]:
    with module_server.client(timeout=20) as c:
        yield c


def test_train_until_step_never_trains_past_it(client: Client) -> None:
    session = client.create_session(TEXT, hidden_size=16, seed=1)
    first = session.train(until_step=30).wait()
    assert (first.step, first.steps_done, first.stop_reason) == (30, 30, pb.STOP_REASON_COMPLETED)
    again = session.train(until_step=30).wait()  # the retry of a call whose reply was lost
    assert (again.step, again.steps_done, again.stop_reason) == (30, 0, pb.STOP_REASON_COMPLETED)
    session.step()
    behind = session.train(until_step=30).wait()  # already past: nothing to do
    assert (behind.step, behind.steps_done) == (31, 0)
    assert session.info().step == 31


def test_a_retried_step_is_not_applied_twice(client: Client) -> None:
    session = client.create_session(TEXT, hidden_size=16, seed=2)
    session.train(5).wait()
    applied = session.step(until_step=6)
    assert (applied.step, applied.replayed) == (6, False) and applied.chars > 0
    retried = session.step(until_step=6)  # its first try was applied: same answer, no update
    assert (retried.step, retried.replayed, retried.chars) == (6, True, 0)
    assert retried.loss == applied.loss
    assert session.info().step == 6
    assert session.step(until_step=7).step == 7  # the next one goes ahead


@pytest.mark.parametrize(
    ("steps", "until_step", "message"),
    [(5, 10, "give steps or until_step, not both"), (0, 0, "until_step must be >= 1")],
)
def test_bad_until_step_is_refused_with_what_to_fix(
    client: Client, steps: int, until_step: int, message: str
) -> None:
    session = client.create_session(TEXT, hidden_size=16, seed=3)
    with pytest.raises(InvalidArgument, match=message):
        session.train(steps, until_step=until_step).wait()
    with pytest.raises(InvalidArgument, match="until_step must be >= 1"):
        session.step(until_step=0)


def test_until_step_beyond_the_train_limit_names_the_setting(client: Client) -> None:
    session = client.create_session(TEXT, hidden_size=16, seed=4)
    with pytest.raises(RnnServeError, match="--max-train-steps") as raised:
        session.train(until_step=501).wait()
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_cli_train_until_step_twice_trains_once(
    module_server: ServerHandle, client: Client
) -> None:
    client.create_session(TEXT, session_id="cli-until", hidden_size=16, seed=5)
    for done in (40, 0):
        run = rnnserve(module_server, "--json", "train", "cli-until", "--until-step", "40")
        assert run.returncode == 0, run.stderr
        final = json.loads(run.stdout.splitlines()[-1])
        assert (int(final["step"]), int(final["steps_done"])) == (40, done)
