"""Validation split, validation loss in Train / WatchLoss / GetSession, and Train's stop
conditions (until_loss, patience, the runaway guard), against a real server."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from rnnserve import Client, InvalidArgument, TrainingDiverged
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve_server.engine.model_config import ModelConfig
from rnnserve_server.engine.trainer import Trainer
from rnnserve_server.engine.vocab import Vocab

from tests.cli_runner import rnnserve

if TYPE_CHECKING:
    from tests.conftest import ServerFactory, ServerHandle

pytestmark = pytest.mark.timeout(90)

TEXT = "The quick brown fox jumps over the lazy dog. " * 40  # 1800 chars
SMALL: dict[str, Any] = {"hidden_size": 16, "seq_length": 10, "batch_size": 4, "seed": 3}


@pytest.fixture
def client(module_server: ServerHandle) -> Iterator[Client]:
    with module_server.client(timeout=20) as c:
        yield c


def test_trainer_never_trains_on_the_held_out_tail() -> None:
    """Every window a corpus step reads lies in the head; the tail is only evaluated."""
    text = "ab" * 200 + "xyz" * 40  # 400 head chars, a 120-char tail of other characters
    vocab = Vocab.from_text(text)
    config = ModelConfig(
        hidden_size=8,
        seq_length=7,
        batch_size=3,
        learning_rate=0.05,
        optimizer="adam",
        validation_fraction=120 / 520,
    )
    trainer = Trainer(config, vocab, vocab.encode(text))
    assert trainer.validation_length == 120 and trainer.train_length == 400
    for _ in range(300):
        trainer.step()
        assert int(trainer.cursors.max()) <= trainer.train_length
    # Trained only on "abab...", the model has never seen x, y or z follow anything.
    tail = vocab.encode(text[400:])
    measured = trainer.validation_loss()
    assert measured is not None
    assert measured == pytest.approx(trainer.evaluate(tail), rel=1e-6)
    assert measured > math.log(vocab.size)  # worse than uniform: never seen


def test_long_tails_are_scored_as_strands_from_zero_states(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long tail is read as parallel strands, each from a zero state, in bounded chunks:
    the same sum as scoring each strand alone, and close to one strand over all of it."""
    from rnnserve_server.engine.rnn import scoring

    text = TEXT * 3
    vocab = Vocab.from_text(text)
    config = ModelConfig(
        hidden_size=16,
        seq_length=10,
        batch_size=4,
        learning_rate=3e-3,
        optimizer="adam",
        seed=2,
        dtype="float64",
        validation_fraction=0.5,
    )
    trainer = Trainer(config, vocab, vocab.encode(text))
    for _ in range(150):
        trainer.step()
    tail = trainer.corpus[-trainer.validation_length :].astype(np.int32)
    whole = trainer.evaluate(tail)
    measured = trainer.validation_loss()
    assert measured is not None and measured == pytest.approx(whole, rel=0.02)
    # Small strands and chunks: the batched sum equals each strand scored on its own.
    monkeypatch.setattr(scoring, "_VALIDATION_STRAND_CHARS", 100)
    monkeypatch.setattr(scoring, "_VALIDATION_CHUNK_FLOATS", 500)
    inputs, targets = tail[:-1], tail[1:]
    strands = min(64, len(inputs) // 100)
    length = len(inputs) // strands
    expected = (
        sum(
            scoring.score(
                trainer.params,
                inputs[i * length : (i + 1) * length],
                targets[i * length : (i + 1) * length],
            )[1]
            for i in range(strands)
        )
        + scoring.score(trainer.params, inputs[strands * length :], targets[strands * length :])[1]
    )
    assert scoring.score_strands(trainer.params, tail) == pytest.approx(expected, rel=1e-12)


def test_validation_loss_in_train_watch_and_get(
    client: Client, server_factory: ServerFactory
) -> None:
    session = client.create_session(TEXT, validation_fraction=0.2, **SMALL)
    info = session.info()
    assert info.validation_chars == 360 and info.config.validation_fraction == pytest.approx(0.2)
    assert not info.HasField("validation_loss")  # nothing measured yet
    messages = list(session.train(40, report_every=10))
    progress, final = messages[:-1], messages[-1]
    assert [m.step for m in progress] == [10, 20, 30]
    assert all(m.HasField("validation_loss") and m.validation_step == m.step for m in progress)
    assert final.stop_reason == pb.STOP_REASON_COMPLETED
    assert final.validation_step == 40 and final.validation_loss > 0
    # The model learns: the held-out loss falls.
    assert final.validation_loss < progress[0].validation_loss
    points = []
    with session.watch_loss(1) as stream:
        for point in stream:
            points.append(point)
            if point.step == 40:
                break
    with_validation = {p.step: p.validation_loss for p in points if p.HasField("validation_loss")}
    assert sorted(with_validation) == [10, 20, 30, 40]
    assert with_validation[40] == pytest.approx(final.validation_loss)
    assert with_validation[10] == pytest.approx(progress[0].validation_loss)
    got = session.info()
    assert got.validation_loss == pytest.approx(final.validation_loss)
    assert got.validation_step == 40


def test_validation_history_survives_a_restart(server_factory: ServerFactory) -> None:
    server = server_factory()
    with server.client(timeout=20) as c:
        session = c.create_session(TEXT, session_id="v", validation_fraction=0.1, **SMALL)
        final = session.train(20, report_every=5).wait()
        assert final.validation_step == 20
    assert server.stop() == 0
    again = server_factory(data_dir=server.data_dir)
    with again.client(timeout=20) as c:
        info = c.session("v").info()
        assert info.validation_step == 20
        assert info.validation_loss == pytest.approx(final.validation_loss)
        assert info.config.validation_fraction == pytest.approx(0.1)
        with c.session("v").watch_loss(1) as stream:
            steps = []
            for point in stream:
                if point.HasField("validation_loss"):
                    steps.append(point.step)
                if point.step == 20:
                    break
        assert steps == [5, 10, 15, 20]


def test_until_loss_stops_at_the_target(client: Client) -> None:
    session = client.create_session("Hallo", preset="notebook", seed=1)
    final = session.train(5000, report_every=50, until_loss=0.5).wait()
    assert final.stop_reason == pb.STOP_REASON_TARGET_LOSS
    assert final.steps_done < 5000
    assert final.smoothed_loss <= 0.5
    assert session.predict("Hallo").predicted == "alloH"


def test_until_loss_uses_the_validation_loss_with_a_split(client: Client) -> None:
    session = client.create_session(TEXT, validation_fraction=0.2, **SMALL)
    first = session.train(10, report_every=10).wait()
    target = first.validation_loss - 0.05
    final = session.train(2000, report_every=20, eval_every=5, until_loss=target).wait()
    assert final.stop_reason == pb.STOP_REASON_TARGET_LOSS
    assert final.validation_loss <= target
    assert final.steps_done % 5 == 0 and final.steps_done < 2000


def test_patience_stops_when_validation_stops_improving(client: Client) -> None:
    # The head teaches "ab" alternation; the tail is "aa...": learning the head makes the
    # held-out loss worse, so it never beats its first measurement.
    text = "ab" * 400 + "a" * 200
    session = client.create_session(
        text,
        validation_fraction=0.2,
        hidden_size=16,
        seq_length=10,
        batch_size=4,
        learning_rate=0.01,
        optimizer="adam",
        seed=1,
    )
    final = session.train(1000, report_every=10, eval_every=10, patience=3).wait()
    assert final.stop_reason == pb.STOP_REASON_EARLY_STOPPED
    assert final.steps_done == 40  # measured at 10 (best), 20, 30, 40: three without a new best


def test_patience_needs_a_validation_split(client: Client) -> None:
    session = client.create_session(TEXT, **SMALL)
    with pytest.raises(InvalidArgument, match="validation_fraction"):
        session.train(10, patience=2).wait()
    with pytest.raises(InvalidArgument, match="validation_fraction"):
        client.create_session(TEXT, validation_fraction=0.9, **SMALL)


def test_runaway_learning_rate_stops_as_diverged_and_cli_exits_8(
    module_server: ServerHandle, client: Client
) -> None:
    client.create_session(TEXT, session_id="runaway", learning_rate=1e30, optimizer="sgd", **SMALL)
    result = rnnserve(
        module_server, "--json", "train", "runaway", "--steps", "200", "--report-every", "10"
    )
    assert result.returncode == 8, result.stderr
    final = json.loads(result.stdout.splitlines()[-1])
    assert final["stop_reason"] == "STOP_REASON_DIVERGED"
    assert final["step"] < 200
    assert "rnnserve set runaway --learning-rate" in result.stderr


def test_cli_train_stop_flags_and_samples(module_server: ServerHandle, client: Client) -> None:
    client.create_session("Hallo", session_id="cli-hallo", preset="notebook", seed=1)
    result = rnnserve(
        module_server,
        "--json",
        "train",
        "cli-hallo",
        "--steps",
        "3000",
        "--report-every",
        "100",
        "--until-loss",
        "0.3",
        "--sample-length",
        "8",
        "--sample-temperature",
        "0",
        "--sample-prime",
        "Ha",
    )
    assert result.returncode == 0, result.stderr
    final = json.loads(result.stdout.splitlines()[-1])
    assert final["stop_reason"] == "STOP_REASON_TARGET_LOSS"
    # Greedy after "Ha": the prime, then the corpus continued (cyclically).
    assert final["sample"] == "Ha" + "lloHallo"
    plain = rnnserve(module_server, "train", "cli-hallo", "--steps", "5", "--patience", "2")
    assert plain.returncode == 6
    assert "validation_fraction" in plain.stderr


def test_a_non_finite_update_points_at_rnnserve_set(client: Client) -> None:
    session = client.create_session(
        "Hallo", session_id="abort-msg", preset="notebook", learning_rate=1e38, seed=1
    )
    with pytest.raises(TrainingDiverged) as error:
        for _ in range(100):
            session.step()
    assert "rnnserve set abort-msg --learning-rate" in error.value.details
    assert "rnnserve fork abort-msg" in error.value.details
    # The command it names is accepted as is.
    assert session.update(learning_rate=1e-3).config.learning_rate == pytest.approx(1e-3)
