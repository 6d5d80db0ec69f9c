"""Per-session series (rnnserve_session_*) scraped from real servers: their values, the
--metrics-max-sessions cap (most recently active kept), and their removal when a session is
deleted or moves to another replica; the divergence counter."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rnnserve import TrainingDiverged
from rnnserve.v1 import rnn_service_pb2 as pb
from rnnserve_server.metrics import Throughput
from rnnserve_server.testing import free_port

from tests.test_cluster import wait_until

if TYPE_CHECKING:
    from tests.cluster_fixtures import RedisProcess
    from tests.conftest import ServerFactory

TEXT = "the quick brown fox jumps over the lazy dog. " * 20
SERIES = (
    "rnnserve_session_step",
    "rnnserve_session_smoothed_loss",
    "rnnserve_session_validation_loss",
    "rnnserve_session_chars_per_second",
)

# {metric name: {session id: value}} of the per-session series, and the unlabelled samples.
PerSession = dict[str, dict[str, float]]


def scrape(port: int) -> tuple[PerSession, dict[str, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode("utf-8")
    per_session: PerSession = {name: {} for name in SERIES}
    plain: dict[str, float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if "session_id" in sample.labels:
                per_session[sample.name][sample.labels["session_id"]] = sample.value
            elif not sample.labels:
                plain[sample.name] = sample.value
    return per_session, plain


def sessions_in(port: int) -> set[str]:
    """The session ids with a step series on the server's /metrics."""
    return set(scrape(port)[0]["rnnserve_session_step"])


@pytest.mark.timeout(60)
def test_session_series_show_step_losses_and_speed_until_deleted(
    server_factory: ServerFactory,
) -> None:
    port = free_port()
    server = server_factory(metrics_port=port)
    with server.client() as client:
        trained = client.create_session(
            TEXT, session_id="t", hidden_size=16, seed=1, validation_fraction=0.1
        )
        trained.train(200, report_every=100, eval_every=50).wait()
        client.create_session(TEXT, session_id="fresh", hidden_size=16, seed=1)
        info = trained.info()
        series, plain = scrape(port)
        assert series["rnnserve_session_step"] == {"t": 200, "fresh": 0}
        assert series["rnnserve_session_smoothed_loss"] == {"t": pytest.approx(info.smoothed_loss)}
        assert series["rnnserve_session_validation_loss"] == {
            "t": pytest.approx(info.validation_loss)
        }
        assert plain["rnnserve_session_series_omitted"] == 0
        # chars/s is the mean over the last 10 complete seconds: above 0 once the second the
        # Train ran in is over, 0 for a session that never trained.
        wait_until(
            lambda: scrape(port)[0]["rnnserve_session_chars_per_second"]["t"] > 0,
            what="chars/s of t above 0",
        )
        assert scrape(port)[0]["rnnserve_session_chars_per_second"]["fresh"] == 0
        trained.delete()
        after, _ = scrape(port)
        assert {name: set(values) for name, values in after.items()} == {
            "rnnserve_session_step": {"fresh"},
            "rnnserve_session_smoothed_loss": set(),
            "rnnserve_session_validation_loss": set(),
            "rnnserve_session_chars_per_second": {"fresh"},
        }


@pytest.mark.timeout(60)
def test_the_cap_keeps_the_most_recently_active_sessions(server_factory: ServerFactory) -> None:
    port = free_port()
    server = server_factory(metrics_port=port, metrics_max_sessions=2)
    with server.client() as client:
        sessions = [
            client.create_session(TEXT, session_id=name, hidden_size=16, seed=1)
            for name in ("a", "b", "c")
        ]
        for session in sessions:
            session.step()
        assert sessions_in(port) == {"b", "c"}
        assert scrape(port)[1]["rnnserve_session_series_omitted"] == 1
        sessions[0].step()
        series, _ = scrape(port)
        assert series["rnnserve_session_step"] == {"a": 2, "c": 1}
        # A session training right now stays in, however long ago its Train began.
        stream = sessions[1].train(10**6, report_every=1)
        try:
            next(stream)  # (a for loop left early would cancel the Train)
            sessions[0].step()
            sessions[2].step()
            assert sessions_in(port) == {"b", "c"}
            assert sessions[1].info().state == pb.SESSION_STATE_TRAINING
        finally:
            stream.cancel()


@pytest.mark.timeout(30)
def test_no_session_series_with_a_cap_of_zero_and_a_negative_cap_is_refused(
    server_factory: ServerFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from rnnserve_server.config import load_settings

    with pytest.raises(SystemExit) as exit_info:
        load_settings(["--metrics-max-sessions", "-1"], environ={})
    assert exit_info.value.code == 2
    assert "--metrics-max-sessions must be >= 0" in capsys.readouterr().err
    port = free_port()
    server = server_factory(metrics_port=port, metrics_max_sessions=0)
    with server.client() as client:
        client.create_session(TEXT, session_id="x", hidden_size=16, seed=1).step()
    series, plain = scrape(port)
    assert series["rnnserve_session_step"] == {}
    assert plain["rnnserve_session_series_omitted"] == 1


@pytest.mark.timeout(60)
def test_divergences_are_counted(server_factory: ServerFactory) -> None:
    port = free_port()
    server = server_factory(metrics_port=port)
    with server.client() as client:
        session = client.create_session(
            TEXT, session_id="d", preset="notebook", learning_rate=1e38, seed=1
        )
        session.step()
        assert scrape(port)[1]["rnnserve_training_divergences_total"] == 0
        assert session.train(50).wait().stop_reason == pb.STOP_REASON_DIVERGED
        assert scrape(port)[1]["rnnserve_training_divergences_total"] == 1
        with pytest.raises(TrainingDiverged):
            session.step()
        assert scrape(port)[1]["rnnserve_training_divergences_total"] == 2


@pytest.mark.timeout(120)
def test_a_sessions_series_move_with_it_between_replicas(
    server_factory: ServerFactory, redis_server: RedisProcess, tmp_path: Path
) -> None:
    """Only the replica holding a session reports it: once the first gives the session up
    (idle: its lease released), its series go, and the replica that takes it reports them."""
    ports = [free_port(), free_port()]
    first, second = (
        server_factory(
            redis_url=redis_server.url,
            shared_dir=tmp_path / "shared",
            lease_ttl=2,
            idle_release_seconds=1,
            metrics_port=port,
        )
        for port in ports
    )
    with first.client() as client:
        client.create_session(TEXT, session_id="m", hidden_size=16, seed=1).train(20).wait()
    assert sessions_in(ports[0]) == {"m"} and sessions_in(ports[1]) == set()
    wait_until(lambda: sessions_in(ports[0]) == set(), what="the first replica to release m")
    with second.client() as client:
        assert client.session("m").step().step == 21
    series, _ = scrape(ports[1])
    assert series["rnnserve_session_step"] == {"m": 21}
    assert sessions_in(ports[0]) == set()


def test_throughput_is_the_mean_over_complete_seconds_and_forgets_idle_sessions() -> None:
    meter = Throughput(window=10)
    meter.add("s", 100, now=1000.2)
    meter.add("s", 100, now=1000.9)
    meter.add("s", 300, now=1001.5)
    assert meter.rate("s", now=1001.7) == 20.0  # only second 1000 is complete: 200 / 10
    assert meter.rate("s", now=1002.0) == 50.0
    assert meter.rate("s", now=1011.0) == 30.0  # second 1000 left the window
    assert meter.rate("s", now=1012.0) == 0.0
    assert meter.rate("never", now=1012.0) == 0.0
    meter.add("t", 1, now=1013.0)  # a window later: s is forgotten
    assert meter.rate("s", now=1001.7) == 0.0
