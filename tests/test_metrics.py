"""Prometheus metrics scraped over HTTP from a real server: RPCs, streams, training, sessions."""

from __future__ import annotations

import urllib.error
import urllib.request
from typing import TYPE_CHECKING

import pytest
import rnnserve_server
from prometheus_client.parser import text_string_to_metric_families
from rnnserve import SessionNotFound
from rnnserve_server.metrics import metrics_host, split_method
from rnnserve_server.testing import free_port

if TYPE_CHECKING:
    from tests.conftest import ServerFactory, ServerHandle

TEXT = "the quick brown fox jumps over the lazy dog. " * 20

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[str, Samples]:
    """GET /metrics: (content type, {(sample name, labels): value})."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        content_type = response.headers.get("Content-Type", "")
        body = response.read().decode("utf-8")
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return content_type, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


KINDS = {
    "CreateSession": "unary",
    "Step": "unary",
    "GetSession": "unary",
    "Train": "server_stream",
    "Generate": "server_stream",
    "WatchLoss": "server_stream",
    "AppendText": "client_stream",
}


def rpcs(samples: Samples, method: str, code: str = "OK", name: str = "handled") -> float:
    """grpc_server_<name>_total of an RnnService method (with grpc_code for handled)."""
    labels = {
        "grpc_type": KINDS[method],
        "grpc_service": "rnnserve.v1.RnnService",
        "grpc_method": method,
    }
    if name == "handled":
        labels["grpc_code"] = code
    return value(samples, f"grpc_server_{name}_total", **labels)


@pytest.fixture
def metrics_server(server_factory: ServerFactory) -> tuple[ServerHandle, int]:
    port = free_port()
    server = server_factory(metrics_port=port, checkpoint_interval=0)
    server.wait_for_log("metrics_serving", port=port)
    return server, port


@pytest.mark.timeout(60)
def test_counters_move_with_rpcs(metrics_server: tuple[ServerHandle, int]) -> None:
    server, port = metrics_server
    content_type, before = scrape(port)
    assert content_type.startswith("text/plain")
    assert value(before, "rnnserve_sessions") == 0
    assert value(before, "rnnserve_training_updates_total") == 0

    with server.client() as client:
        assert client.health() == "SERVING"
        session = client.create_session(TEXT, session_id="m1", hidden_size=16, seq_length=8)
        session.step()
        session.append_text(iter(["the lazy fox ", "jumps over the dog"]))
        progress = list(session.train(20, report_every=5))
        assert progress[-1].steps_done == 20
        text = session.generate(50, prime="t", seed=1)
        assert len(text) == 50
        with pytest.raises(SessionNotFound):
            client.session("nope").info()

    # The client can see a call end before the server has recorded it; the server records the
    # metric before it logs the call's line, so wait for the lines of the calls that end last.
    for method, code in (("Train", "OK"), ("Generate", "OK"), ("GetSession", "NOT_FOUND")):
        server.wait_for_log("rpc", method=f"/rnnserve.v1.RnnService/{method}", code=code)
    _, after = scrape(port)
    assert rpcs(after, "CreateSession") == 1
    assert rpcs(after, "Step") == 1
    assert rpcs(after, "Train") == 1
    assert rpcs(after, "Generate") == 1
    assert rpcs(after, "AppendText") == 1
    assert rpcs(after, "GetSession", "NOT_FOUND") == 1
    assert rpcs(after, "Train", name="started") == 1
    assert rpcs(after, "GetSession", name="started") == 1
    # Train sent one message per report (steps 5, 10, 15, 20): the final one is the last report.
    assert rpcs(after, "Train", name="msg_sent") == len(progress)
    assert rpcs(after, "Step", name="msg_sent") == 1
    assert rpcs(after, "Step", name="msg_received") == 1
    # AppendText streamed two chunks (the iterable's two pieces) in two messages, then the
    # chunk marked last (AppendTextRequest.marks_last).
    assert rpcs(after, "AppendText", name="msg_received") == 3
    health = value(
        after,
        "grpc_server_handled_total",
        grpc_type="unary",
        grpc_service="grpc.health.v1.Health",
        grpc_method="Check",
        grpc_code="OK",
    )
    assert health >= 1
    train_latency = value(
        after,
        "grpc_server_handling_seconds_count",
        grpc_type="server_stream",
        grpc_service="rnnserve.v1.RnnService",
        grpc_method="Train",
    )
    assert train_latency == 1
    # Every stream finished, so none is in flight.
    streams = value(
        after, "rnnserve_active_streams", grpc_service="rnnserve.v1.RnnService", grpc_method="Train"
    )
    assert streams == 0
    build = [labels for (name, labels) in after if name == "rnnserve_build_info"]
    assert len(build) == 1 and after[("rnnserve_build_info", build[0])] == 1
    assert dict(build[0])["version"] == rnnserve_server.__version__ != "0+unknown"
    assert value(after, "rnnserve_training_updates_total") == 21
    # One corpus update trains on batch_size * seq_length characters.
    updates_chars = value(after, "rnnserve_training_chars_total")
    assert updates_chars > 0 and updates_chars % 8 == 0
    assert value(after, "rnnserve_sessions") == 1
    assert value(after, "rnnserve_sessions_resident") == 1
    # Train flushes its session before its final message.
    assert value(after, "rnnserve_sessions_on_disk") == 1
    assert value(after, "rnnserve_checkpoints_total", result="ok") >= 1
    assert value(after, "rnnserve_checkpoint_duration_seconds_count") >= 1
    assert value(after, "rnnserve_checkpoints_total", result="error") == 0
    assert value(after, "process_resident_memory_bytes") > 0


@pytest.mark.timeout(60)
def test_active_streams_counts_a_watch_in_flight(
    metrics_server: tuple[ServerHandle, int],
) -> None:
    server, port = metrics_server
    labels = {"grpc_service": "rnnserve.v1.RnnService", "grpc_method": "WatchLoss"}
    with server.client() as client:
        session = client.create_session(TEXT, session_id="w1", hidden_size=8, seq_length=4)
        session.step()
        watch = session.watch_loss(from_step=1)
        first = next(watch)  # the stream is open once its history arrived
        assert first.step == 1
        _, during = scrape(port)
        assert value(during, "rnnserve_active_streams", **labels) == 1
        mark = server.mark()
        watch.cancel()
        server.wait_for_log("rpc", start=mark, method="/rnnserve.v1.RnnService/WatchLoss")
    _, after = scrape(port)
    assert value(after, "rnnserve_active_streams", **labels) == 0
    assert rpcs(after, "WatchLoss", "CANCELLED") == 1


@pytest.mark.timeout(60)
def test_metrics_off_by_default(server_factory: ServerFactory) -> None:
    port = free_port()
    server = server_factory()
    assert not any(e.get("event") == "metrics_serving" for e in server.logs)
    with pytest.raises(urllib.error.URLError):
        scrape(port)


def test_metrics_host_follows_the_grpc_address() -> None:
    assert metrics_host("0.0.0.0:50051") == "0.0.0.0"
    assert metrics_host("[::]:50051") == "::"
    assert metrics_host("localhost:50051") == "localhost"
    assert metrics_host(":50051") == "0.0.0.0"
    assert split_method("/rnnserve.v1.RnnService/Train") == ("rnnserve.v1.RnnService", "Train")


@pytest.mark.timeout(60)
def test_jobs_by_state_and_queue_wait(server_factory: ServerFactory) -> None:
    port = free_port()
    server = server_factory(metrics_port=port, max_running_jobs=1)
    server.wait_for_log("metrics_serving", port=port)
    with server.client() as client:
        sessions = [
            client.create_session("abc " * 200, session_id=f"m{i}", hidden_size=16)
            for i in range(2)
        ]
        jobs = [s.start_training(1_000_000, report_every=10) for s in sessions]
        for job in jobs:  # both have had a turn: the second waited for the first
            with job.follow() as stream:
                next(iter(stream))
        _, during = scrape(port)
        for job in jobs:
            job.stop()
    _, after = scrape(port)
    assert (
        value(during, "rnnserve_jobs", state="queued")
        + value(during, "rnnserve_jobs", state="running")
        == 2
    )
    assert value(during, "rnnserve_job_queue_wait_seconds_count") >= 1
    assert value(after, "rnnserve_jobs", state="queued") == 0
    assert value(after, "rnnserve_jobs", state="running") == 0
