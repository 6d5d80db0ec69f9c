"""deploy/prometheus and deploy/grafana against a real Prometheus (Debian's package).

promtool checks the configs and rules and runs tests/prometheus/rules_test.yml (every alert
firing and not firing); a real prometheus scrapes a training cluster replica and evaluates
every rule and every dashboard query, which must find the training session's series.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rnnserve_server.testing import find_binary, free_port

from tests.test_cluster import wait_until

if TYPE_CHECKING:
    from tests.cluster_fixtures import RedisProcess
    from tests.conftest import ServerFactory
    from tests.prometheus_fixtures import PrometheusFactory, PrometheusProcess

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TEST = ROOT / "tests" / "prometheus" / "rules_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "rnnserve.json"
TEXT = "the quick brown fox jumps over the lazy dog. " * 20
# What Grafana puts in for the dashboard's variables, for a query run straight at Prometheus.
RATE_INTERVAL = "1m"

# The names of the series rnnserve exports, as they appear in a PromQL expression.
METRIC_NAME = re.compile(r"(?<![\w:])(?:rnnserve|grpc_server)_\w+(?![\w:])")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_binary("promtool"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def dashboard_queries(session_id: str = ".*") -> list[str]:
    """Every panel query of the dashboard, its variables filled in as Grafana would."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return [
        q.replace("$session_id", session_id).replace("$__rate_interval", RATE_INTERVAL)
        for q in queries
    ]


def alert_names() -> list[str]:
    return re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), flags=re.MULTILINE)


def test_configs_and_rules_pass_promtool_check() -> None:
    for config in ("prometheus.yml", "prometheus-cluster.yml"):
        checked = promtool("check", "config", str(PROMETHEUS_DIR / config))
        assert checked.returncode == 0, checked.stdout + checked.stderr
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert set(alert_names()) == {
        "RnnserveSessionsUnsaved",
        "RnnserveCheckpointsFailing",
        "RnnserveLeaseLost",
        "RnnserveFailover",
        "RnnserveTrainingDiverged",
    }


def test_every_alert_fires_and_stays_quiet_in_promtool_unit_tests() -> None:
    tested = promtool("test", "rules", str(RULES_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Each alert has a case where it fires (exp_labels) and one where it does not ([]).
    cases = re.findall(
        r"- alertname: (\w+)\n\s+eval_time: [^\n]+\n\s+exp_alerts:(.*)", RULES_TEST.read_text()
    )
    for name in alert_names():
        outcomes = {rest.strip() == "[]" for alert, rest in cases if alert == name}
        assert outcomes == {True, False}, f"{name}: {outcomes}"


def scrape_names(port: int) -> set[str]:
    """The names of the samples a server's /metrics has right now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode("utf-8")
    return {s.name for f in text_string_to_metric_families(body) for s in f.samples}


def session_ids(result: list[dict[str, Any]]) -> set[str]:
    return {r["metric"].get("session_id", "") for r in result}


def all_rules(prometheus: PrometheusProcess) -> list[dict[str, Any]]:
    groups = prometheus.api("rules")["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.mark.timeout(120)
def test_prometheus_scrapes_a_training_replica_and_every_query_finds_its_session(
    server_factory: ServerFactory,
    redis_server: RedisProcess,
    prometheus_factory: PrometheusFactory,
    tmp_path: Path,
) -> None:
    # A cluster replica exports every series the rules and the dashboard use.
    port = free_port()
    server = server_factory(
        redis_url=redis_server.url, shared_dir=tmp_path / "shared", metrics_port=port
    )
    prometheus = prometheus_factory([f"127.0.0.1:{port}"], [RULES])
    with server.client() as client:
        session = client.create_session(
            TEXT, session_id="dash", hidden_size=16, seed=1, validation_fraction=0.1
        )
        final = session.train(300, report_every=100, eval_every=50).wait()
        info = session.info()
    assert final.step == 300 and info.validation_loss > 0

    # Every metric name of the rules (as Prometheus loaded them) and the dashboard is scraped.
    rules = all_rules(prometheus)
    used = {
        n for q in [r["query"] for r in rules] + dashboard_queries() for n in METRIC_NAME.findall(q)
    }
    assert {"rnnserve_session_step", "rnnserve_cluster_failovers_total"} <= used
    assert used - scrape_names(port) == set()

    # Prometheus has scraped the trained session.
    def scraped() -> bool:
        result = prometheus.query('rnnserve_session_step{session_id="dash"}')
        return bool(result) and float(result[0]["value"][1]) == 300

    wait_until(scraped, what="step 300 of session dash in Prometheus")

    # Every dashboard query evaluates (an error fails at once) and returns series: the
    # per-session ones the session's, the rates once two scrapes are in.
    per_session = [q for q in dashboard_queries("dash") if "session_id" in q]
    service = [q for q in dashboard_queries("dash") if "session_id" not in q]
    assert len(per_session) == 4 and service

    def every_query_answers() -> bool:
        return all(session_ids(prometheus.query(q)) == {"dash"} for q in per_session) and all(
            prometheus.query(q) for q in service
        )

    wait_until(every_query_answers, what="every dashboard query answering")
    (loss,) = prometheus.query(per_session[0])  # the smoothed loss panel
    assert float(loss["value"][1]) == pytest.approx(info.smoothed_loss)
    (validation,) = prometheus.query(per_session[1])
    assert float(validation["value"][1]) == pytest.approx(info.validation_loss)
    # The chars/s gauge shows the training: a mean over complete seconds, above 0 from the
    # second after the Train's for 10 s.
    wait_until(
        lambda: bool(
            prometheus.query(
                'max_over_time(rnnserve_session_chars_per_second{session_id="dash"}[5m]) > 0'
            )
        ),
        what="chars/s of dash above 0 in Prometheus",
    )

    # Every rule evaluates against the real series and the recording rules carry the session;
    # a healthy server fires no alert.
    def rules_evaluated() -> bool:
        evaluated = all(not r["lastEvaluation"].startswith("0001") for r in all_rules(prometheus))
        return evaluated and bool(
            prometheus.query('session_id:rnnserve_session_step:max{session_id="dash"}')
        )

    wait_until(rules_evaluated, what="every rule evaluated")
    rules = all_rules(prometheus)
    assert {r["health"] for r in rules} == {"ok"}, [r.get("lastError") for r in rules]
    assert prometheus.api("alerts")["alerts"] == []
